//! The `stargaze-fs` binary keeps the services' command-line contract
//! (`stargaze_testkit::service_cli`).

stargaze_testkit::service_cli_tests!(env!("CARGO_BIN_EXE_stargaze-fs"), "stargaze-fs");
