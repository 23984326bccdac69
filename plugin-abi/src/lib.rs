//! stub
pub mod abi;
mod normalize;
pub mod sdk;

pub use normalize::{DEFAULT_ACCOUNT_ID, MAX_ACCOUNT_ID_LEN, normalize_account_id};
