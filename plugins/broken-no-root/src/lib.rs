//! A cdylib that exports a C function but no channeld root module: the loader must name it
//! "not a channeld plugin" and load the rest of the directory.

/// Something a C program might call.
#[unsafe(no_mangle)]
pub extern "C" fn channeld_broken_answer() -> u32 {
    42
}
