//! docs/configuration.md cannot drift from the binaries: every flag each one accepts (read from
//! its `--help`, which clap generates) is in that binary's section.

use std::process::Command;

/// The `--flags` in `help`.
fn flags(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-h, ")
                .or(l.strip_prefix("-V, "))
                .unwrap_or(l);
            let flag = l.strip_prefix("--")?.split([' ', '=', '<']).next()?;
            (!flag.is_empty()).then(|| format!("--{flag}"))
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

/// The text of `## <title>` up to the next `## `.
fn section<'a>(doc: &'a str, title: &str) -> &'a str {
    let start = doc
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no section `## {title}`"));
    let rest = &doc[start + 4..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn every_flag_of_every_binary_is_documented() -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))?;
    let mut missing = Vec::new();
    for (bin, args, title) in [
        ("strait-proxy", &["run", "--help"][..], "strait-proxy run"),
        ("strait-proxy", &["init", "--help"][..], "strait-proxy init"),
        (
            "strait-proxy",
            &["await-ready", "--help"][..],
            "strait-proxy await-ready",
        ),
        (
            "strait-control-plane",
            &["--help"][..],
            "strait-control-plane",
        ),
        ("strait-injector", &["--help"][..], "strait-injector"),
    ] {
        let out = Command::new(strait_testbed::bin(bin)?)
            .args(args)
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        let found = flags(&help);
        assert!(
            found.len() >= 2,
            "{bin} {args:?}: no flags read from:\n{help}"
        );
        let text = section(&doc, title);
        for flag in found {
            if !text.contains(&format!("`{flag}`")) && !text.contains(&format!("`{flag} ")) {
                missing.push(format!("{title}: {flag}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "undocumented in docs/configuration.md: {missing:?}"
    );
    Ok(())
}
