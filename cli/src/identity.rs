//! `strait identity`: create the trust anchor and issuer of a new installation, and issue new
//! issuers (for rotation).

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

#[derive(Debug, clap::Subcommand)]
pub enum IdentityCmd {
    /// Create a trust anchor (ca.crt, ca.key) and an issuer signed by it (issuer.crt, issuer.key).
    Init {
        /// Where to write the four PEM files.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
        anchor_lifetime: Duration,
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        issuer_lifetime: Duration,
    },
    /// Issue a new issuer from an anchor (rotation). Writes --out-cert and --out-key.
    IssueIssuer {
        #[arg(long)]
        anchor_cert: PathBuf,
        #[arg(long)]
        anchor_key: PathBuf,
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
}

/// Writes `text` to `path` through a temporary file and a rename, so readers never see half.
fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn run(cmd: IdentityCmd) -> Result<()> {
    match cmd {
        IdentityCmd::Init {
            dir,
            trust_domain,
            anchor_lifetime,
            issuer_lifetime,
        } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let ca =
                strait_identity::ca::generate(&trust_domain, anchor_lifetime, issuer_lifetime)?;
            write(&dir.join("ca.crt"), &ca.anchor_cert_pem, false)?;
            write(&dir.join("ca.key"), &ca.anchor_key_pem, true)?;
            write(&dir.join("issuer.crt"), &ca.issuer_cert_pem, false)?;
            write(&dir.join("issuer.key"), &ca.issuer_key_pem, true)?;
            println!(
                "wrote {0}/ca.crt (trust anchor), {0}/ca.key, {0}/issuer.crt, {0}/issuer.key (keep the keys secret)",
                dir.display()
            );
        }
        IdentityCmd::IssueIssuer {
            anchor_cert,
            anchor_key,
            out_cert,
            out_key,
            trust_domain,
            lifetime,
        } => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let (cert, key) = strait_identity::ca::issue_issuer(
                &read(&anchor_cert)?,
                &read(&anchor_key)?,
                &trust_domain,
                lifetime,
            )?;
            // Key first: the control plane reloads when the certificate changes.
            write(&out_key, &key, true)?;
            write(&out_cert, &cert, false)?;
            println!("wrote {} and {}", out_cert.display(), out_key.display());
        }
    }
    Ok(())
}
