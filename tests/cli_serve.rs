//! `vcid serve`'s settings through the built binary: a flag beats its
//! environment variable, which beats the `--config` file, which beats the
//! default. Observed through a setting that fails before anything is bound
//! (a missing token file, whose path the error names), so no daemon starts.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `vcid serve ARGS` with only the given VCID_* variables set.
fn serve(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vcid"));
    cmd.arg("serve").args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("VCID_")) {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

/// The one error line of a refused start; exit status 2 (bad input).
fn refusal(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("vcid: error: "), "{stderr}");
    stderr
}

#[test]
fn flag_beats_environment_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = |name: &str| dir.path().join(name).display().to_string();
    let (from_file, from_env, from_flag) = (missing("file"), missing("env"), missing("flag"));
    let config = dir.path().join("vcid.toml");
    std::fs::write(
        &config,
        format!(
            "auth-token-file = {from_file:?}\ndata_dir = {:?}\n",
            missing("data")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let only_file = refusal(&serve(&["--config", config], &[]));
    assert!(
        only_file.contains(&format!("--auth-token-file {from_file}: cannot read it")),
        "{only_file}"
    );
    // The file may also be named by its own variable.
    let file_by_env = refusal(&serve(&[], &[("VCID_CONFIG", config)]));
    assert!(file_by_env.contains(&from_file), "{file_by_env}");

    let env = [("VCID_AUTH_TOKEN_FILE", from_env.as_str())];
    let env_over_file = refusal(&serve(&["--config", config], &env));
    assert!(env_over_file.contains(&from_env), "{env_over_file}");

    let flag = ["--config", config, "--auth-token-file", &from_flag];
    let flag_over_env = refusal(&serve(&flag, &env));
    assert!(flag_over_env.contains(&from_flag), "{flag_over_env}");
    assert!(!Path::new(&missing("data")).exists());
}
