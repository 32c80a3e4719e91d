//! `strait inject`: the webhook's injection applied to manifests offline.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use strait_injector::config::InjectConfig;

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// YAML file (`-` or absent: standard input). The result goes to standard output.
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub config: InjectConfig,
}

pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    let text = match &args.file {
        Some(path) if path.as_os_str() != "-" => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            text
        }
    };
    let anchors = args.config.read_anchors()?;
    if anchors.is_none() {
        eprintln!("strait inject: no --trust-anchors: the injected proxies run without identity (plaintext between proxies)");
    }
    let (out, reports) =
        strait_injector::manifest::inject_yaml(&text, &args.config, anchors.as_deref())?;
    for r in &reports {
        match r.skipped {
            None => eprintln!("{}: injected", r.object),
            Some(why) => eprintln!("{}: skipped ({})", r.object, why.as_str()),
        }
    }
    print!("{out}");
    Ok(())
}
