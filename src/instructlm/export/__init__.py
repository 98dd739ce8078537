"""Export: a run as one GGUF file for llama.cpp, LM Studio and Ollama, with an Ollama folder."""
