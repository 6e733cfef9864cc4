//! The preprocessor: between the OpenAI-shaped frontend and the token-level workers.
//! Pure text logic lives here so the frontend, the real preprocessor actor and the simulator
//! share one implementation.

pub mod codec;
pub mod stop;
pub mod tool_prompt;
