//! The client's integration tests, in process (fakes of the ports, the
//! in-memory engine, an external trainer as a child process), in one test
//! binary: the client, the trainer and the engine are linked once instead of
//! once per file (a cold CI build spent about 20 to 37 s of CPU on each of
//! the five binaries this replaces).

#[path = "../common/mod.rs"]
mod common;

mod abuse_messages;
mod async_versions;
mod external_trainer;
mod message_props;
mod with_the_engine;
mod worker;
