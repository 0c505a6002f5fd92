//! Which aggregation pipelines SCAFFOLD runs with, and why the others are
//! refused. Decided from the stages' declared capabilities, not their
//! names, like FedSelect's refusals.
//!
//! - **mean** (the default), **clip**, **adaptive_clip**, **zeroing** and
//!   the **server optimizers**: the model is aggregated as before. The
//!   caller passes the Δc_i of the clients whose update the round
//!   accepted, so a client the round rejected or zeroing dropped is left
//!   out of c as of the model. A clip bounds the model update, not Δc_i.
//! - **median, trimmed_mean, krum** (refused): a robust combiner distrusts
//!   some updates, and the same rule must then apply to their Δc_i, or a
//!   client Krum left out still steers every other client's correction
//!   through c. The Δc_i would need a robust rule of their own (a
//!   coordinate-wise median of the Δc_i breaks c = mean of the c_i that
//!   the correction relies on); none is defined yet.
//! - **dp_noise** (refused): the Δc_i are computed from the same data and
//!   are not clipped or noised, so the model's DP guarantee would not
//!   cover what the clients send.
//! - **FedSelect** (refused): the personal elements never reach the
//!   server, so c would correct toward a global model those elements do
//!   not follow; the Δc_i would need masks like the update's.

use crate::config::PipelineConfig;
use crate::personalization::Personalization;

/// Ok if SCAFFOLD can run with this pipeline, else the reason.
pub fn check_pipeline(config: &PipelineConfig) -> Result<(), String> {
    let p = config.pipeline();
    if p.combiner.ignores_weights() || p.combiner.needs_gram() {
        return Err(format!(
            "scaffold does not run with the `{}` combiner: a robust combiner leaves some \
             updates out, and their Δc_i would need a rule of their own (none is defined); \
             use mean, with clip or zeroing",
            p.combiner_name()
        ));
    }
    if let Some(noise) = &p.noise {
        return Err(format!(
            "scaffold does not run with `{}`: the clients' Δc_i are neither clipped nor \
             noised, so the DP guarantee would not cover them",
            noise.kind()
        ));
    }
    if config.personalization() != Personalization::None {
        return Err(
            "scaffold does not run with personalization = \"fedselect\": personal \
                    elements never reach the server, so the Δc_i would need masks too"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<(), String> {
        check_pipeline(&PipelineConfig::from_toml(toml).unwrap())
    }

    #[test]
    fn mean_clip_and_optimizers_run_robust_dp_and_fedselect_are_refused() {
        assert!(check("").is_ok());
        assert!(check(
            "[[stages]]\nkind = \"clip\"\nmax_norm = 5.0\n[[stages]]\nkind = \"fedadam\"\n"
        )
        .is_ok());
        for (toml, word) in [
            ("[[stages]]\nkind = \"median\"\n", "median"),
            ("[[stages]]\nkind = \"trimmed_mean\"\nbeta = 0.1\n", "trimmed_mean"),
            ("[[stages]]\nkind = \"krum\"\nbyzantine = 1\n", "krum"),
            (
                "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0\n",
                "dp_noise",
            ),
            ("personalization = \"fedselect\"\n", "fedselect"),
        ] {
            let err = check(toml).unwrap_err();
            assert!(err.contains(word), "{toml}: {err}");
        }
    }
}
