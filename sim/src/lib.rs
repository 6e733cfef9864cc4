//! turbine-sim: runs turbine's actors and scheduling logic on virtual time.
