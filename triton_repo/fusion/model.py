"""Triton adapter: prompt + audio embeddings → the tensorrtllm backend's inputs (af3trt.runtime.prompt; the table by
af3trt.kernels.table on the GPU)."""

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime import conversation
from af3trt.kernels import device_from_params as kernels_device
from af3trt.runtime import contract as c
from af3trt.runtime import triton_io as io
from af3trt.runtime.context import RequestContext
from af3trt.runtime.prompt import FusionLimits, PromptBuilder, PromptError, check_sampling, table_extra_ids
from af3trt.runtime.stop_words import stop_words_list


def _table_tensor(table, dtype: str):
    """[1, N, H] in the decoder's dtype; bf16 has no numpy type, so it crosses as a torch tensor via DLPack.
    table: [N, H] f32 numpy, or a torch tensor already in the decoder dtype (GPU path)."""
    if not isinstance(table, np.ndarray):
        return io.output_tensor(pb, c.PROMPT_EMBEDDING_TABLE, table[None])
    if dtype == "float32":
        return pb.Tensor(c.PROMPT_EMBEDDING_TABLE, table[None])
    import torch
    from torch.utils.dlpack import to_dlpack

    t = torch.from_numpy(table[None]).to(getattr(torch, dtype)).contiguous()
    return pb.Tensor.from_dlpack(c.PROMPT_EMBEDDING_TABLE, to_dlpack(t))


class TritonPythonModel:
    def initialize(self, args):
        p = io.params(args)
        self.limits = FusionLimits.from_params(p)
        self.builder = PromptBuilder(io.resolve(args, p["tokenizer_dir"]), self.limits)
        self.ctx = RequestContext()
        self.device = kernels_device(p, "fusion")  # None: the table is built on the CPU
        if self.device is not None:  # torch (+ triton) only on the GPU path
            from af3trt.kernels import table

            self.device_table = table
            pb.Logger.log_info(f"fusion: prompt table on {self.device} (af3trt.kernels)")

    def execute(self, requests):
        return io.per_request(pb, requests, self.run)

    def run(self, r):
        sampling = check_sampling(
            self.limits, max_tokens=io.scalar(pb, r, c.MAX_TOKENS), temperature=io.scalar(pb, r, c.TEMPERATURE),
            top_k=io.scalar(pb, r, c.TOP_K), top_p=io.scalar(pb, r, c.TOP_P),
            repetition_penalty=io.scalar(pb, r, c.REPETITION_PENALTY), seed=io.scalar(pb, r, c.SEED),
            stream=io.scalar(pb, r, c.STREAM))
        if self.device is None:
            windows = [int(w) for w in io.tensor(pb, r, c.AUDIO_WINDOWS).reshape(-1)]
            conv = self.conversation(r, len(windows))
            ids, table = self.builder.build_conversation(conv, io.tensor(pb, r, c.AUDIO_EMBEDS),
                                                         io.tensor(pb, r, c.INPUT_FEATURES_MASK), windows)
        else:  # inputs may sit on the GPU (FORCE_CPU_ONLY_INPUT_TENSORS "no"); the table is made and stays there
            embeds, mask, windows_t = (io.device_tensor(pb, r, n)
                                       for n in (c.AUDIO_EMBEDS, c.INPUT_FEATURES_MASK, c.AUDIO_WINDOWS))
            conv = self.conversation(r, int(windows_t.numel()))
            ids, table = self.device_table.build(self.builder, conv, self.device, embeds, mask, windows_t)
        if sampling.stream:  # postprocess knows a stream's last response by its token count (or an empty one)
            self.ctx.update(r.request_id(), max_tokens=sampling.max_tokens)
        n_rows = len(table)
        self.ctx.update(r.request_id(), prompt_tokens=len(ids))  # postprocess reports it (usage)
        extra = None
        if self.limits.extra_ids:  # [L] u64, from the window keys preprocess computed (not from the table)
            keys = io.tensor(pb, r, c.AUDIO_DIGEST)
            if keys is None:
                raise PromptError(f"{c.AUDIO_DIGEST} is required with prompt_table_extra_ids (preprocess sends it)")
            extra = table_extra_ids(ids, keys, self.limits.vocab_size)
        if n_rows == 0:  # text-only: a one-row table that no id addresses keeps the tensor well-formed
            table = np.zeros((1, self.limits.hidden_size), np.float32)

        def one(name, value, dtype):
            return pb.Tensor(name, np.array([[value]], dtype=dtype))

        outputs = [
            pb.Tensor(c.INPUT_IDS, ids[None]),  # [1, L]
            one(c.INPUT_LENGTHS, len(ids), np.int32),
            one(c.REQUEST_OUTPUT_LEN, sampling.max_tokens, np.int32),
            one(c.END_ID, self.limits.end_id, np.int32),
            one(c.PAD_ID, self.limits.pad_id, np.int32),
            one(c.STREAMING, sampling.stream, np.bool_),
            one(c.RUNTIME_TOP_K, sampling.top_k, np.int32),
            one(c.RUNTIME_TOP_P, sampling.top_p, np.float32),
            one(c.TEMPERATURE, sampling.temperature, np.float32),
            one(c.REPETITION_PENALTY, sampling.repetition_penalty, np.float32),
            one(c.SEED, sampling.seed, np.uint64),
            one(c.PROMPT_VOCAB_SIZE, max(n_rows, 1), np.int32),
            _table_tensor(table, self.limits.dtype),  # [1, N, H]
        ]
        if self.limits.stop_ids:  # [1, 2, L]: the other end ids, one single-token stop word each
            outputs.append(pb.Tensor(c.STOP_WORDS_LIST, stop_words_list([i] for i in self.limits.stop_ids)[None]))
        if extra is not None:
            outputs.append(pb.Tensor(c.PROMPT_TABLE_EXTRA_IDS, extra[None]))  # [1, L]
        return pb.InferenceResponse(outputs)

    @staticmethod
    def conversation(r, n_clips: int) -> conversation.Conversation:
        """`messages` (a conversation), or the one-turn shorthand text_input + system_prompt."""
        prompt, system, messages = (io.text(pb, r, n) for n in (c.TEXT_INPUT, c.SYSTEM_PROMPT, c.MESSAGES))
        if messages is not None:
            if prompt is not None or system is not None:
                raise PromptError("send either messages or text_input (+ system_prompt), not both")
            return conversation.parse(messages, n_clips)
        if prompt is None:
            raise PromptError("text_input or messages is required")
        return conversation.shorthand(prompt, system, n_clips)
