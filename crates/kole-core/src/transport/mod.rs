//! The message transport seam between the engine/agents and a broker.
