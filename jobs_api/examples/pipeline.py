"""Example custom job type `pipeline`: retrieve, generate, summarize, through the gateway.

Enable it with `JOBS_HANDLERS=jobs_api.examples.pipeline`; the jobs API imports the module and
calls its `register(registry)`. Then submit:

    POST /v1/jobs
    {"type": "pipeline",
     "input": {"question": "What is WAL mode?",
               "documents": ["WAL mode lets readers run during a write.", "Bananas are yellow."],
               "top_k": 1}}

The job runs three phases, each reported as progress with its `phase`:

1. `retrieve`: one embeddings call (`POST /v1/embeddings`) for the question and every document;
   the `top_k` documents most similar to the question (cosine) are kept.
2. `generate`: a chat completion answering the question from the retrieved documents.
3. `summarize`: a second chat completion condensing that answer into one sentence.

The result holds all three outputs: `{"retrieve": {"documents": [...], "scores": [...]},
"generate": {"answer", "upstream"}, "summarize": {"summary", "upstream"}}`. A failed call ends
the attempt the way the built-in `inference` type does (retryable statuses retry the whole job
from `retrieve`; other errors fail it), because every call goes through `ctx.call`.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs_api.handlers import HandlerRegistry, JobContext, PermanentError


class PipelineInput(BaseModel):
    """What a `pipeline` job needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1, max_length=8000)
    documents: list[str] = Field(min_length=1, max_length=256)
    top_k: int = Field(3, ge=1, le=32)
    model: str = "mock-model"
    embedding_model: str = "mock-embedding"
    max_tokens: int = Field(256, ge=1, le=8192)


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors (0 when either is all zeros)."""
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _content(answer: dict[str, Any]) -> str:
    try:
        return str(answer["body"]["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise PermanentError("chat completion answer has no choices[0].message.content") from None


async def retrieve(ctx: JobContext, spec: PipelineInput) -> dict[str, Any]:
    """Embed the question and documents; keep the top_k documents closest to the question."""
    answer = await ctx.call(
        "POST",
        "/v1/embeddings",
        json={"model": spec.embedding_model, "input": [spec.question, *spec.documents]},
    )
    try:
        vectors = [item["embedding"] for item in sorted(answer["body"]["data"], key=lambda d: d["index"])]
    except (KeyError, TypeError):
        raise PermanentError("embeddings answer has no data[].embedding") from None
    if len(vectors) != len(spec.documents) + 1:
        raise PermanentError(
            f"embeddings answer has {len(vectors)} vectors for {len(spec.documents) + 1} inputs"
        )
    query, docs = vectors[0], vectors[1:]
    ranked = sorted(range(len(docs)), key=lambda i: cosine(query, docs[i]), reverse=True)[: spec.top_k]
    return {
        "documents": [spec.documents[i] for i in ranked],
        "scores": [round(cosine(query, docs[i]), 6) for i in ranked],
    }


async def run_pipeline(ctx: JobContext) -> dict[str, Any]:
    """The `pipeline` handler: three phases, three model calls, all outputs in the result."""
    spec = PipelineInput.model_validate(ctx.input)

    await ctx.progress(0, "embedding question and documents", phase="retrieve")
    retrieved = await retrieve(ctx, spec)
    await ctx.log("info", f"retrieved {len(retrieved['documents'])} of {len(spec.documents)} documents")

    await ctx.progress(33, "answering from the retrieved documents", phase="generate")
    context = "\n".join(f"- {doc}" for doc in retrieved["documents"])
    generated = await ctx.call(
        "POST",
        "/v1/chat/completions",
        json={
            "model": spec.model,
            "max_tokens": spec.max_tokens,
            "messages": [
                {"role": "system", "content": f"Answer using only these documents:\n{context}"},
                {"role": "user", "content": spec.question},
            ],
        },
    )
    answer = _content(generated)

    await ctx.progress(66, "summarizing the answer", phase="summarize")
    summarized = await ctx.call(
        "POST",
        "/v1/chat/completions",
        json={
            "model": spec.model,
            "max_tokens": min(spec.max_tokens, 64),
            "messages": [
                {"role": "system", "content": "Summarize the following answer in one sentence."},
                {"role": "user", "content": answer},
            ],
        },
    )
    summary = _content(summarized)

    await ctx.progress(100, "done", phase="summarize")
    return {
        "retrieve": retrieved,
        "generate": {"answer": answer, "upstream": generated["upstream"]},
        "summarize": {"summary": summary, "upstream": summarized["upstream"]},
    }


def register(registry: HandlerRegistry) -> None:
    """Register the `pipeline` job type (called by the jobs API for JOBS_HANDLERS entries)."""
    registry.register("pipeline", run_pipeline, input_model=PipelineInput)
