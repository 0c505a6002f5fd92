//! The safetensors header path every update goes through:
//! `header_from_bytes` with the default limits, then `check_compatible`
//! against a fixed two-tensor reference. Must return Ok or a ModelError,
//! never panic, and an Ok header must describe the bytes it came from.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use fedstep_core::model::{check_compatible, header_from_bytes, ModelHeader};
use fedstep_core::Limits;
use libfuzzer_sys::fuzz_target;
use safetensors::Dtype;

fn reference() -> &'static ModelHeader {
    static REF: OnceLock<ModelHeader> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fedstep-fuzz-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ref.safetensors");
        fedstep_core::writer::write_model(
            &path,
            &[
                ("w".into(), Dtype::F32, vec![2, 3], vec![0u8; 24]),
                ("b".into(), Dtype::F16, vec![3], vec![0u8; 6]),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        header_from_bytes(&bytes, &Limits::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = header_from_bytes(data, &Limits::default()) else {
        return;
    };
    assert_eq!(header.file_len, data.len() as u64);
    for t in &header.tensors {
        assert!(t.start <= t.end && t.end <= header.file_len, "{t:?}");
        assert!(t.start >= 8 + header.header_len, "{t:?}");
        let _ = t.elements();
        let _ = t.byte_len();
    }
    let _ = header.data_bytes();
    let _ = check_compatible(reference(), &header);
    let _ = check_compatible(&header, reference());
});
