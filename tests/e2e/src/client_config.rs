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

/// FedSelect on the client (`[personalization] mode = "fedselect"`); the
/// job's `[aggregation]` must say `personalization = "fedselect"`.
pub struct Personalize {
    /// Share of every float tensor kept personal once ramped up, in [0, 1).
    pub personal_fraction: f64,
    /// Rounds over which the share grows linearly from 0 (0: from round 1).
    pub ramp_rounds: u32,
    /// `[personalization.tensor_fractions]`: per-tensor overrides.
    pub tensor_fractions: Vec<(String, f64)>,
}

pub struct ClientSetup {
    pub client_id: String,
    pub exit_on_complete: bool,
    pub trainer: Trainer,
    /// `None`: the client uploads whole models.
    pub personalization: Option<Personalize>,
}

/// The client's `workdir` (scratch space; FedSelect's personal files live
/// in its `personal/`).
pub fn workdir(d: &Deployment, client_id: &str) -> PathBuf {
    d.path(&format!("work-{client_id}"))
}

/// Writes `<client>.toml` into the deployment's scratch dir; returns its path.
pub fn write(d: &Deployment, c: &ClientSetup) -> PathBuf {
    let toml_str = |s: &str| serde_json::to_string(s).expect("a JSON string is a TOML string");
    let workdir = workdir(d, &c.client_id);
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
    if let Some(p) = &c.personalization {
        // `{:?}` prints an f64 with its decimal point (0.2, never 0), a TOML float.
        text += &format!(
            "[personalization]\nmode = \"fedselect\"\npersonal_fraction = {:?}\nramp_rounds = {}\n",
            p.personal_fraction, p.ramp_rounds
        );
        if !p.tensor_fractions.is_empty() {
            text += "[personalization.tensor_fractions]\n";
            for (name, f) in &p.tensor_fractions {
                text += &format!("{} = {f:?}\n", toml_str(name));
            }
        }
    }
    let path = d.path(&format!("{}.toml", c.client_id));
    std::fs::write(&path, text).expect("writing a client.toml");
    path
}
