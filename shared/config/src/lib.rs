//! stargaze-config
