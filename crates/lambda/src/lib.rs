//! fedstep-lambda as a library: the handlers, the Lambda entry, the
//! emulator worker and the stream-record decoder. The binary (main.rs) only
//! parses its arguments and picks one; the library exists so that tests
//! (and the fuzz target) reach the decoder and handlers directly.

pub mod allocator;
pub mod aws_engine;
pub mod emf;
pub mod emulator_worker;
pub mod handlers;
pub mod lambda;
pub mod logging;
pub mod stream_record;
