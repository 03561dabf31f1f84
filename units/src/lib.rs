//! Byte sizes the way QEMU writes them: parsing `512`, `64k`, `1M`, `1.5G` (qemu-img's
//! size syntax, used by `thinvm image` and `thinvm run --memory`) and printing `324 KiB`,
//! `1.5 GiB` (QEMU's `size_to_str`). A leaf crate so the image tool and the VMM share it
//! without depending on each other.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

/// A string that is not a size.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid size '{input}' (expected e.g. 512, 64k, 1M, 2G)")]
pub struct SizeError {
    /// The string as given.
    pub input: String,
}

/// Parses a size with an optional binary suffix (k/K, m/M, g/G, t/T, p/P, e/E; `b`/`B`
/// alone means bytes). Plain numbers are bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let bad = || SizeError {
        input: s.to_string(),
    };
    if t.is_empty() {
        return Err(bad());
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    // Fractions like 1.5G (as QEMU accepts).
    let f: f64 = num.parse().map_err(|_| bad())?;
    if !f.is_finite() || f < 0.0 {
        return Err(bad());
    }
    let v = f * mult as f64;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    // `v` is finite, at least 0 and below 2^64 (checked above): the cast only drops the
    // fraction of a byte, as QEMU does.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bytes = v as u64;
    Ok(bytes)
}

/// QEMU's `size_to_str`: three significant digits and a binary unit, e.g. `324 KiB`,
/// `1 GiB`, `1.5 MiB`.
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut div = 1u64;
    // QEMU switches to the next unit once the value reaches 1000 of the current one.
    while i < UNITS.len() - 1 && (v as f64) >= 1000.0 * div as f64 {
        i += 1;
        div <<= 10;
    }
    if i == 0 {
        return format!("{v} B");
    }
    let x = v as f64 / div as f64;
    format!("{} {}", three_significant(x), UNITS[i])
}

/// Formats like C's `%0.3g` for values in [1, 1000).
fn three_significant(x: f64) -> String {
    let s = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("").is_err());
        assert!(parse_size("12q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn human_sizes_like_qemu() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(331776), "324 KiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }
}
