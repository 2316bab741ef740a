//! The systemd unit and the install script operators and the Vagrantfile use.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use shoal_tests::shoal_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn install_into(root: &Path, args: &[&str]) {
    let out = Command::new(repo().join("packaging/install.sh"))
        .args(args)
        .env("DESTDIR", root)
        .env("SHOAL_BIN", shoal_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {out:?}");
}

/// `systemd-analyze verify` of the installed unit in a root that has the system's units.
/// It exits 0 even on unknown keys, so any output counts as a failure.
fn verify(root: &Path) -> String {
    if !root.join("usr/lib/systemd/system").exists() {
        fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        let copied = Command::new("cp")
            .args(["-a", "/usr/lib/systemd/system"])
            .arg(root.join("usr/lib/systemd/"))
            .status()
            .unwrap();
        assert!(copied.success());
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/shoal.service")
        .output()
        .expect("systemd-analyze (installed by scripts/setup.sh)");
    format!(
        "{}{}{}",
        if out.status.success() {
            ""
        } else {
            "exit status not 0\n"
        },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn installed_unit_verifies_and_a_broken_one_does_not() {
    let root = tempfile::tempdir().unwrap();
    install_into(root.path(), &["--advertise-addr", "192.168.56.10"]);
    let bin = root.path().join("usr/local/bin/shoal");
    assert_eq!(
        fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        verify(root.path()),
        "",
        "the shipped unit must verify cleanly"
    );

    let unit = root.path().join("etc/systemd/system/shoal.service");
    let text = fs::read_to_string(&unit).unwrap();
    assert!(text.contains("Type=notify") && text.contains("Restart=on-failure"));
    fs::write(&unit, text.replace("Type=notify", "Type=notifyy")).unwrap();
    assert!(
        verify(root.path()).contains("Failed to parse service type"),
        "the check must catch a broken unit"
    );
}

#[test]
fn install_sets_the_advertise_address_and_keeps_an_existing_config() {
    let root = tempfile::tempdir().unwrap();
    install_into(root.path(), &["--advertise-addr", "192.168.56.10"]);
    let config = root.path().join("etc/shoal/agent.toml");
    fs::write(
        &config,
        fs::read_to_string(&config).unwrap() + "log_level = \"debug\"\n",
    )
    .unwrap();
    install_into(root.path(), &["--advertise-addr", "192.168.56.11"]);
    let text = fs::read_to_string(&config).unwrap();
    let set: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("advertise_addr"))
        .collect();
    assert_eq!(set, ["advertise_addr = \"192.168.56.11\""]);
    assert!(
        text.contains("log_level = \"debug\""),
        "operator edits are kept"
    );

    // The agent parses the shipped file and stops only at the address this host lacks.
    let out = Command::new(shoal_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "shoal: no interface of this host has the advertise address 192.168.56.11"
    );
}

#[test]
fn vagrant_and_the_docs_provision_with_the_same_script() {
    let vagrantfile = fs::read_to_string(repo().join("Vagrantfile")).unwrap();
    assert!(vagrantfile.contains("/vagrant/packaging/install.sh --advertise-addr"));
    for name in ["manager1", "worker1", "worker2"] {
        assert!(
            vagrantfile.contains(&format!("\"{name}\"")),
            "{name} in the Vagrantfile"
        );
    }
    let operations = fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    assert!(operations.contains("packaging/install.sh --advertise-addr"));
}
