"""Stand-ins for the AUTOMATIC1111 ``modules`` package (1.10; Forge keeps the same script API). Each module names the
upstream file it mirrors and keeps the upstream signatures of what the Fair Adaptors script touches; the
bodies are our own minimal implementations of the documented behaviour (no upstream code is copied here)."""
