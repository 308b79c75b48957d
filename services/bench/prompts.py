"""The prompts every benchmark sends: built-in, or one per line of a file."""

from __future__ import annotations

from pathlib import Path

# Short, varied English prompts shared by the mesh bench, the engine bench and the llama.cpp peer
# (bench/llamacpp_peer.py), so all three measure the same work.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a short story about a robot who learns to paint.",
    "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the health benefits of drinking water?",
    "Describe a sunset to someone who has never seen one.",
    "Why is the sky blue?",
    "Suggest a name for a friendly golden retriever.",
    "How does a bicycle stay upright?",
    "List five fruits that are high in vitamin C.",
    "What should I pack for a weekend camping trip?",
    "Explain what a black hole is.",
)


def load_prompts(path: Path | None) -> list[str]:
    """One prompt per non-blank line of `path`, or the built-in prompts.

    Raises ValueError when the file holds no prompt."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
