//! Link flags for the binaries.
//!
//! On Linux with glibc the binary is a position-independent executable, and its
//! read-only tables (vtables, string tables, the SDKs' static data) carry about
//! 100,000 relative relocations. As RELA entries that is 2.4 MB that the loader
//! reads at every start and that stays resident; packed as RELR (DT_RELR) it is
//! 33 KB, and an idle `serve` is about 2.4 MiB smaller (bench/analysis.md). A
//! dynamically linked binary then needs glibc 2.36 or newer, where the loader
//! refuses an older glibc by naming `GLIBC_ABI_DT_RELR`; the static image
//! relocates itself. `DLQ_BRIDGE_RELA_RELOCS=1` links without packing, for a
//! host with an older glibc.

use std::env;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=DLQ_BRIDGE_RELA_RELOCS");
    let linux_gnu = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    let opted_out = env::var_os("DLQ_BRIDGE_RELA_RELOCS").is_some_and(|v| v == "1");
    if linux_gnu && !opted_out {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
