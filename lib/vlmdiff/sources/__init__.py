"""The paper preset's `source: import` side: VQAv2 and VSR, LLaVA-More, Llama-Scope, and the model/SAE check."""
