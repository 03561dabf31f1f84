//! `thinvm image info`.

use std::path::Path;

use block::inspect::ImageInfo;
use serde_json::{json, Value};
use units::human_size;

use crate::args::OutputFormat;
use crate::error::{CliError, Result};

/// qemu-img's JSON for one image.
pub fn to_json(i: &ImageInfo) -> Value {
    let mut v = json!({
        "filename": i.filename,
        "format": i.format.name(),
        "virtual-size": i.virtual_size,
        "actual-size": i.usage.allocated_bytes,
        "dirty-flag": i.qcow2.as_ref().is_some_and(|q| q.dirty),
    });
    let Some(obj) = v.as_object_mut() else {
        return v;
    };
    if let Some(cs) = i.cluster_size {
        obj.insert("cluster-size".into(), json!(cs));
    }
    if let Some(b) = &i.backing_filename {
        obj.insert("backing-filename".into(), json!(b));
    }
    if let Some(b) = &i.full_backing_filename {
        obj.insert("full-backing-filename".into(), json!(b));
    }
    if let Some(f) = i.backing_filename_format {
        obj.insert("backing-filename-format".into(), json!(f.name()));
    }
    if let Some(q) = &i.qcow2 {
        // Like qemu-img, v2 images report only the fields v2 has.
        let data = if q.compat == "0.10" {
            json!({
                "compat": q.compat,
                "compression-type": q.compression_type,
                "refcount-bits": q.refcount_bits,
            })
        } else {
            json!({
                "compat": q.compat,
                "compression-type": q.compression_type,
                "lazy-refcounts": q.lazy_refcounts,
                "refcount-bits": q.refcount_bits,
                "corrupt": q.corrupt,
                "extended-l2": q.extended_l2,
            })
        };
        obj.insert(
            "format-specific".into(),
            json!({ "type": "qcow2", "data": data }),
        );
    }
    v
}

/// qemu-img's human-readable form of one image.
pub fn to_human(i: &ImageInfo) -> String {
    let mut s = String::new();
    s.push_str(&format!("image: {}\n", i.filename));
    s.push_str(&format!("file format: {}\n", i.format.name()));
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        human_size(i.virtual_size),
        i.virtual_size
    ));
    s.push_str(&format!(
        "disk size: {}\n",
        human_size(i.usage.allocated_bytes)
    ));
    s.push_str(&format!(
        "apparent size: {}\n",
        human_size(i.usage.apparent_bytes)
    ));
    if let Some(cs) = i.cluster_size {
        s.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(b) = &i.backing_filename {
        match &i.full_backing_filename {
            Some(full) if full != b => {
                s.push_str(&format!("backing file: {b} (actual path: {full})\n"))
            }
            _ => s.push_str(&format!("backing file: {b}\n")),
        }
    }
    if let Some(f) = i.backing_filename_format {
        s.push_str(&format!("backing file format: {}\n", f.name()));
    }
    if let Some(q) = &i.qcow2 {
        s.push_str("Format specific information:\n");
        s.push_str(&format!("    compat: {}\n", q.compat));
        s.push_str(&format!("    compression type: {}\n", q.compression_type));
        if q.compat == "0.10" {
            s.push_str(&format!("    refcount bits: {}\n", q.refcount_bits));
        } else {
            s.push_str(&format!("    lazy refcounts: {}\n", q.lazy_refcounts));
            s.push_str(&format!("    refcount bits: {}\n", q.refcount_bits));
            s.push_str(&format!("    corrupt: {}\n", q.corrupt));
            s.push_str(&format!("    extended l2: {}\n", q.extended_l2));
        }
        if q.dirty {
            s.push_str("    dirty: true\n");
        }
    }
    s
}

pub fn run(
    file: &Path,
    output: OutputFormat,
    backing_chain: bool,
    force_share: bool,
) -> Result<()> {
    let chain = if backing_chain {
        block::inspect::info_chain_shared(file, force_share)
    } else {
        block::inspect::info_shared(file, force_share).map(|i| vec![i])
    }
    .map_err(|e| CliError::image(file, e))?;
    match output {
        OutputFormat::Json => {
            let v = if backing_chain {
                Value::Array(chain.iter().map(to_json).collect())
            } else {
                chain.first().map(to_json).unwrap_or(Value::Null)
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            let parts: Vec<String> = chain.iter().map(to_human).collect();
            print!("{}", parts.join("\n"));
        }
    }
    Ok(())
}
