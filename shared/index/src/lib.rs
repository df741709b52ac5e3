//! stargaze-index
