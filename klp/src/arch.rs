//! Build-time selection of the native architecture back-end (owned by the arch work).
