//! Safetensors model files written for a test.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

/// Writes a model of one f32 tensor `w` holding `values` to `path`,
/// creating its directory.
pub fn write_f32_model(path: &Path, values: &[f32]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fedstep_core::writer::write_model(
        path,
        &[("w".into(), Dtype::F32, vec![values.len()], bytes)],
        &BTreeMap::new(),
    )?;
    Ok(())
}
