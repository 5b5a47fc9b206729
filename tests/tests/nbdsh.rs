//! libnbd from Python (what nbdsh runs): every error code, survival after
//! each error, deep pipelining, and step-by-step option negotiation.
//! The scripts live in tests/py; they print "ALL OK" when every check held.

use snapgate_e2e::*;
use std::process::Command;

fn python(script: &str, args: &[String]) -> String {
    let path = py_dir().join(script);
    let out = run_output(Command::new(SYS_PYTHON).arg(&path).args(args));
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && so.contains("ALL OK"),
        "{script} failed ({}):\n{so}\n{se}",
        out.status
    );
    so
}

#[test]
fn error_codes_and_pipelining() {
    if !require_python_nbd() {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("vol", "64M");
    gw.snapshot("vol", "snap");
    let out = python(
        "nbd_errors.py",
        &[gw.nbd_uri("vol"), gw.nbd_uri("vol@snap")],
    );
    println!("{out}");
    assert!(gw.healthy(), "gateway unhealthy after error tests");
}

#[test]
fn option_negotiation() {
    if !require_python_nbd() {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("vol", "48M");
    gw.create_volume("other", "1M");
    gw.snapshot("vol", "snap");
    let base = format!("nbd://127.0.0.1:{}/", gw.nbd_port);
    let out = python(
        "opt_mode.py",
        &[base, "vol".into(), "snap".into(), (48u64 << 20).to_string()],
    );
    println!("{out}");
}

#[test]
fn nbdsh_command_line() {
    // nbdsh itself (as an operator would run it), with the system python.
    if !require_tool("nbdsh") || !require_python_nbd() {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "1M");
    let out = run(Command::new("nbdsh")
        .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .args(["-u", &gw.nbd_uri("v"), "-c"])
        .arg("h.pwrite(b'snapgate' * 512, 4096); h.flush(); print(h.get_size(), bytes(h.pread(8, 4096)))"));
    assert_eq!(out.trim(), "1048576 b'snapgate'", "nbdsh output: {out}");
}
