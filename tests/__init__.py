"""tm2fs test suite: unit tests call handlers directly; integration tests start real parts."""
