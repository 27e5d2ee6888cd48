//! Shadow variables (owned by the shadow-variable work).
