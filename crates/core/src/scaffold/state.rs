//! The server variate between rounds: one safetensors file per round, like
//! the server optimizers' state (`state_in` → `state_out`), holding c's
//! tensors under the model's names and, as metadata, `fedstep.scaffold`
//! (the marker), `fedstep.scaffold.step` (rounds carried) and
//! `fedstep.scaffold.clients` (the N it was scaled by). The same file is
//! what clients download as the round's c.
//!
//! A file another job or another model wrote is refused with the reason,
//! never reinterpreted: the marker must be there and N must match.

use std::collections::BTreeMap;

use super::variate::{ControlVariate, VariateLayout};
use crate::limits::Limits;

const MARKER: &str = "fedstep.scaffold";
const STEP: &str = "fedstep.scaffold.step";
const CLIENTS: &str = "fedstep.scaffold.clients";

/// c and how far it has been carried.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    pub variate: ControlVariate,
    /// Rounds whose Δc_i went into it (0: the zeros of round 1).
    pub step: u64,
    /// The job's N.
    pub total_clients: usize,
}

impl ServerState {
    /// Round 1's c: zeros.
    pub fn initial(layout: &VariateLayout, total_clients: usize) -> ServerState {
        ServerState {
            variate: ControlVariate::zeros(layout),
            step: 0,
            total_clients,
        }
    }
}

/// The state file's bytes.
pub fn write_state(state: &ServerState) -> Result<Vec<u8>, String> {
    let meta = BTreeMap::from([
        (MARKER.to_string(), "server_control_variate".to_string()),
        (STEP.to_string(), state.step.to_string()),
        (CLIENTS.to_string(), state.total_clients.to_string()),
    ]);
    state.variate.to_bytes(&meta)
}

/// Reads a state file against the model's layout and the job's N.
pub fn read_state(
    bytes: &[u8],
    layout: &VariateLayout,
    total_clients: usize,
    limits: &Limits,
) -> Result<ServerState, String> {
    let (variate, meta) = ControlVariate::parse(bytes, layout, limits)?;
    if !meta.contains_key(MARKER) {
        return Err(format!(
            "no `{MARKER}` metadata: not a SCAFFOLD server state"
        ));
    }
    let number = |key: &str| -> Result<u64, String> {
        meta.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("`{key}` is missing or not a number"))
    };
    let step = number(STEP)?;
    let n = number(CLIENTS)? as usize;
    if n != total_clients {
        return Err(format!(
            "state was scaled for N = {n} clients, the job has {total_clients}"
        ));
    }
    Ok(ServerState {
        variate,
        step,
        total_clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaffold::variate::VariateLayout;

    fn layout() -> VariateLayout {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let w = [0u8; 12];
        let model = safetensors::serialize(
            [("w", TensorView::new(Dtype::F32, vec![3], &w).unwrap())],
            None,
        )
        .unwrap();
        VariateLayout::of_model_bytes(&model, &Limits::default()).unwrap()
    }

    #[test]
    fn round_trips_and_refuses_foreign_files() {
        let l = layout();
        let s = ServerState {
            variate: ControlVariate::from_values(&l, vec![vec![1.0, 2.0, -3.0]]).unwrap(),
            step: 4,
            total_clients: 3,
        };
        let bytes = write_state(&s).unwrap();
        assert_eq!(read_state(&bytes, &l, 3, &Limits::default()).unwrap(), s);
        let err = read_state(&bytes, &l, 5, &Limits::default()).unwrap_err();
        assert!(err.contains("N = 3"), "{err}");
        // A bare variate (a client's Δc_i) is not a server state.
        let bare = s.variate.to_bytes(&BTreeMap::new()).unwrap();
        let err = read_state(&bare, &l, 3, &Limits::default()).unwrap_err();
        assert!(err.contains("not a SCAFFOLD server state"), "{err}");
        assert_eq!(
            ServerState::initial(&l, 3).variate.values()[0],
            vec![0.0; 3]
        );
    }
}
