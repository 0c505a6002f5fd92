//! client.toml files for a deployment's clients (examples/client.toml
//! documents every key).

use std::path::PathBuf;

use crate::Deployment;

/// How a test client trains.
pub enum Trainer {
    /// The built-in MLP on the bundled digits, mostly `classes`.
    Builtin { classes: Vec<u8>, seed: u64 },
    /// An external program (argv, no shell).
    External { command: Vec<String> },
}

pub struct ClientSetup {
    pub client_id: String,
    pub exit_on_complete: bool,
    pub trainer: Trainer,
}

/// Writes `<client>.toml` into the deployment's scratch dir; returns its path.
pub fn write(d: &Deployment, c: &ClientSetup) -> PathBuf {
    let toml_str = |s: &str| serde_json::to_string(s).expect("a JSON string is a TOML string");
    let workdir = d.path(&format!("work-{}", c.client_id));
    let mut text = format!(
        "client_id = {}\nqueue_url = {}\nbucket = {}\nupdates_table = {}\n\
         s3_force_path_style = true\nvisibility_timeout_seconds = 60\nwait_seconds = 10\n\
         exit_on_complete = {}\nworkdir = {}\n",
        toml_str(&c.client_id),
        toml_str(&d.queue_url(&c.client_id)),
        toml_str(&d.bucket()),
        toml_str(&d.str_at("/tables/updates")),
        c.exit_on_complete,
        toml_str(&workdir.display().to_string()),
    );
    match &c.trainer {
        Trainer::Builtin { classes, seed } => {
            text += &format!(
                "[trainer]\nkind = \"builtin\"\ndataset = \"digits\"\nclasses = {classes:?}\n\
                 sel_prob = 1.0\ndef_prob = 0.05\nseed = {seed}\nlocal_epochs = 1\n"
            );
        }
        Trainer::External { command } => {
            let argv: Vec<String> = command.iter().map(|a| toml_str(a)).collect();
            text += &format!(
                "[trainer]\nkind = \"external\"\ncommand = [{}]\ntimeout_seconds = 120\n",
                argv.join(", ")
            );
        }
    }
    let path = d.path(&format!("{}.toml", c.client_id));
    std::fs::write(&path, text).expect("writing a client.toml");
    path
}
