//! `thinvm image create`.

use std::path::PathBuf;

use block::qcow2::{CreateOptions, Qcow2Version};
use block::ImageFormat;
use units::parse_size;

use crate::args::FormatArg;
use crate::error::{CliError, Result};

pub struct CreateArgs {
    pub format: FormatArg,
    pub backing: Option<String>,
    pub backing_format: Option<FormatArg>,
    pub options: Vec<String>,
    pub quiet: bool,
    pub file: PathBuf,
    pub size: Option<String>,
}

/// Parses `-o key=value,key=value` into the creation options.
fn apply_options(opts: &mut CreateOptions, list: &[String], format: ImageFormat) -> Result<()> {
    for item in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            CliError::Usage(format!("invalid option '{item}' (expected key=value)"))
        })?;
        if format == ImageFormat::Raw {
            return Err(CliError::Usage(format!(
                "raw images take no options (got '{key}')"
            )));
        }
        match key {
            "cluster_size" => opts.cluster_size = parse_size(value)?,
            "compat" => {
                opts.version = Qcow2Version::from_compat(value)
                    .map_err(CliError::InvalidOption)?
            }
            "refcount_bits" => {
                opts.refcount_bits = value.parse().map_err(|_| {
                    CliError::Usage(format!("invalid refcount_bits '{value}'"))
                })?
            }
            "backing_file" => opts.backing_file = Some(value.to_string()),
            "backing_fmt" => {
                opts.backing_format = Some(
                    value
                        .parse()
                        .map_err(CliError::InvalidOption)?,
                )
            }
            "size" => opts.size = Some(parse_size(value)?),
            other => {
                return Err(CliError::Usage(format!(
                    "unknown option '{other}' (supported: cluster_size, compat, refcount_bits, backing_file, backing_fmt, size)"
                )))
            }
        }
    }
    Ok(())
}

pub fn run(a: CreateArgs) -> Result<()> {
    let format: ImageFormat = a.format.into();
    let mut opts = CreateOptions {
        size: a.size.as_deref().map(parse_size).transpose()?,
        backing_file: a.backing.clone(),
        backing_format: a.backing_format.map(Into::into),
        ..CreateOptions::default()
    };
    apply_options(&mut opts, &a.options, format)?;
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(CliError::Usage("-F requires a backing file (-b)".into()));
    }
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt={}", a.file.display(), format.name());
        if format == ImageFormat::Qcow2 {
            line.push_str(&format!(" cluster_size={}", opts.cluster_size));
        }
        if let Some(s) = opts.size {
            line.push_str(&format!(" size={s}"));
        }
        if let Some(b) = &opts.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = opts.backing_format {
            line.push_str(&format!(" backing_fmt={}", f.name()));
        }
        if format == ImageFormat::Qcow2 {
            line.push_str(&format!(
                " compat={} refcount_bits={}",
                opts.version.compat_name(),
                opts.refcount_bits
            ));
        }
        println!("{line}");
    }
    block::create(&a.file, format, &opts).map_err(|e| match e {
        block::Error::InvalidArgument(m) => CliError::Usage(format!("{}: {m}", a.file.display())),
        other => CliError::image(&a.file, other),
    })
}
