"""The OpenAI wire protocol shared by the gateway and the model servers: request schemas and errors."""
