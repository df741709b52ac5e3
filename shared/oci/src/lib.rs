//! stargaze-oci
