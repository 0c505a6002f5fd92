//! Starting the binaries under test against a deployment.

use std::process::Command;

use crate::client_config::{self, ClientSetup, Personalize, Trainer};
use crate::{Binaries, Deployment, Process};

/// `fedstep-lambda local --deploy <json>`: the aggregator of the deployment.
/// Every worker takes activity tasks and reads the whole stream itself.
///
/// The aggregator needs no scratch space: the worker runs with `TMPDIR`
/// pointing at a directory that does not exist and with its working
/// directory in an empty one ([`worker_scratch`]) that scenarios check is
/// still empty at the end.
pub fn worker(d: &Deployment, bins: &Binaries, name: &str) -> Process {
    let cwd = worker_scratch(d, name);
    std::fs::create_dir_all(&cwd).expect("the worker's working directory");
    let mut cmd = Command::new(&bins.lambda);
    cmd.arg("local")
        .arg("--deploy")
        .arg(&d.json_path)
        .args(["--worker-name", name])
        .current_dir(&cwd)
        .envs(&d.aws_env)
        .env("TMPDIR", d.path(&format!("{name}-no-tmp-here")))
        .env("RUST_LOG", "info");
    Process::spawn(name, cmd, &d.path(&format!("{name}.log")))
}

/// The working directory a worker runs in; nothing should appear there.
pub fn worker_scratch(d: &Deployment, name: &str) -> std::path::PathBuf {
    d.path(&format!("{name}-cwd"))
}

/// Panics if a worker left anything in its working directory or created
/// its `TMPDIR`: the aggregation reads and writes the store in place.
pub fn assert_worker_wrote_nothing(d: &Deployment, name: &str) {
    let left: Vec<_> = std::fs::read_dir(worker_scratch(d, name))
        .expect("the worker's working directory")
        .map(|e| e.map(|e| e.path()))
        .collect();
    assert!(left.is_empty(), "worker {name} wrote {left:?}");
    assert!(
        !d.path(&format!("{name}-no-tmp-here")).exists(),
        "worker {name} created its TMPDIR"
    );
}

/// `fedstep-client run --config <client>.toml`.
pub fn client(d: &Deployment, bins: &Binaries, setup: &ClientSetup) -> Process {
    let config = client_config::write(d, setup);
    let mut cmd = Command::new(&bins.client);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .current_dir(crate::repo_root())
        .envs(&d.aws_env)
        .env("RUST_LOG", "info");
    Process::spawn(
        &setup.client_id,
        cmd,
        &d.path(&format!("client-{}.log", setup.client_id)),
    )
}

/// Three built-in-trainer clients with `exit_on_complete`, mostly digits
/// 0–3, 4–6 and 7–9 (non-IID, every class covered), seeds 1, 2, 3;
/// `personalize` gives each client's `[personalization]`, if any.
pub fn digits_clients(
    d: &Deployment,
    bins: &Binaries,
    ids: &[&str; 3],
    personalize: impl Fn(&str) -> Option<Personalize>,
) -> Vec<Process> {
    let classes: [Vec<u8>; 3] = [vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]];
    ids.iter()
        .zip(classes)
        .enumerate()
        .map(|(i, (id, classes))| {
            client(
                d,
                bins,
                &ClientSetup {
                    client_id: id.to_string(),
                    exit_on_complete: true,
                    trainer: Trainer::Builtin {
                        classes,
                        seed: i as u64 + 1,
                    },
                    personalization: personalize(id),
                },
            )
        })
        .collect()
}

/// Runs `fedstep <args>` to completion with the deployment's environment;
/// panics (showing its output) unless it exits 0. Returns stdout.
pub fn fedstep(d: &Deployment, bins: &Binaries, args: &[&str]) -> String {
    let out = Command::new(&bins.fedstep)
        .args(args)
        .envs(d.cli_env())
        .output()
        .unwrap_or_else(|e| panic!("running fedstep {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "fedstep {args:?} exited {}:\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A job file in the deployment's scratch dir with a fresh initial model
/// (`fedstep model init`) beside it; `body` is everything but `job_id` and
/// `initial_model`. Returns the job file's path as a string.
pub fn job_file(d: &Deployment, bins: &Binaries, job_id: &str, body: &str) -> String {
    let init = d.path(&format!("{job_id}-init.safetensors"));
    fedstep(d, bins, &["model", "init", "--out", init.to_str().unwrap()]);
    let path = d.path(&format!("{job_id}.toml"));
    let text = format!(
        "job_id = \"{job_id}\"\ninitial_model = \"{}\"\n{body}",
        init.file_name().unwrap().to_str().unwrap()
    );
    std::fs::write(&path, text).expect("writing a job file");
    path.to_str().unwrap().to_string()
}

/// The logs of every process, for failure messages.
pub fn logs(procs: &[&Process]) -> String {
    procs
        .iter()
        .map(|p| p.log_tail(30))
        .collect::<Vec<_>>()
        .join("\n")
}

/// examples/job.toml as shipped, with only its job_id replaced (ids are
/// single-use), and the initial model made the way its comment says
/// (`fedstep model init --out init.safetensors` beside it).
pub fn example_job_file(d: &Deployment, bins: &Binaries, job_id: &str) -> String {
    let example = crate::repo_root().join("examples/job.toml");
    let text = std::fs::read_to_string(&example).expect("examples/job.toml");
    let original = "job_id = \"digits-001\"";
    assert!(
        text.contains(original),
        "examples/job.toml has no `{original}` line"
    );
    assert!(text.contains("initial_model = \"init.safetensors\""));
    let dir = d.path("example");
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init.safetensors");
    fedstep(d, bins, &["model", "init", "--out", init.to_str().unwrap()]);
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        text.replace(original, &format!("job_id = \"{job_id}\"")),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}
