"""Triton adapter: prompt + audio embeddings → the tensorrtllm backend's inputs (af3trt.runtime.stages.prompt; the table by
af3trt.kernels.table on the GPU)."""

import numpy as np
import triton_python_backend_utils as pb

from af3trt.runtime.stages import conversation, guided
from af3trt.kernels import device_of as kernels_device
from af3trt.runtime.stages import contract as c
from af3trt.runtime.triton import triton_io as io
from af3trt.runtime.engines.gpus import cap_cuda_memory
from af3trt.runtime.triton.context import RequestContext, RunningRequests
from af3trt.runtime.stages.errors import Unsupported
from af3trt.runtime.stages.params import FusionParams
from af3trt.runtime.stages.prompt import PromptBuilder, PromptError, check_sampling, table_extra_ids, window_rows
from af3trt.runtime.stages.stop_words import stop_words_list


class NoThinking(Unsupported):
    """A thinking request to a deployment built without think/."""


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
        p = self.limits = FusionParams.parse(io.params(args))  # a FusionLimits, what the prompt builder reads
        self.builder = PromptBuilder(io.resolve(args, p.tokenizer_dir), self.limits)
        self.ctx = RequestContext()
        self.running = RunningRequests(args["model_name"])  # the supervisor's drain reads it
        # thinking (build/think.py): built with think/, and the decoder's LoRA task id of its adapter if it has one
        self.think, self.think_task_id = p.think, p.think_lora_task_id
        # guides: checked here by compiling them (GPU target: the tensorrtllm backend fails every request of the batch
        # when a guide does not compile, build/trtllm_guided.py); on the CPU target the decoder compiles and refuses
        self.guides = None
        if p.guide_check:
            from af3trt.runtime.engines.grammar import Grammars

            self.guides = Grammars(io.resolve(args, p.tokenizer_dir), p.vocab_size, (p.end_id, *p.stop_ids))
            self.guides.compiler()  # xgrammar and the vocabulary loaded now, not on the first guided request
        self.device = kernels_device(p.gpu_kernels, p.kernels_device, "fusion")  # None: the table is built on the CPU
        cap_cuda_memory(p.cuda_memory_cap_bytes, self.device, "fusion")  # build/memory_plan.py stub_caps (GPU target)
        if self.device is not None:  # torch (+ triton) only on the GPU path
            from af3trt.kernels import table
            from af3trt.kernels.check import warm

            off = warm(self.device)  # compiled and checked now, not on the first request; torch path if they fail
            if off:
                pb.Logger.log_warn(f"fusion: {off}; using the torch table")

            self.device_table = table
            pb.Logger.log_info(f"fusion: prompt table on {self.device} (af3trt.kernels)")

    def execute(self, requests):
        with self.running.of(len(requests)):
            return io.per_request(pb, requests, self.run)

    def run(self, r):
        sampling = check_sampling(
            self.limits, max_tokens=io.scalar(pb, r, c.MAX_TOKENS), temperature=io.scalar(pb, r, c.TEMPERATURE),
            top_k=io.scalar(pb, r, c.TOP_K), top_p=io.scalar(pb, r, c.TOP_P),
            repetition_penalty=io.scalar(pb, r, c.REPETITION_PENALTY), seed=io.scalar(pb, r, c.SEED),
            stream=io.scalar(pb, r, c.STREAM), min_tokens=io.scalar(pb, r, c.MIN_TOKENS),
            ignore_eos=io.scalar(pb, r, c.IGNORE_EOS))
        thinking = bool(io.scalar(pb, r, c.THINKING) or False)
        guide = guided.from_request(io.text(pb, r, c.GUIDE_TYPE), io.text(pb, r, c.GUIDE))
        guided.check_combination(guide, thinking=thinking, ignore_eos=sampling.ignore_eos,
                                 min_tokens=sampling.min_tokens)
        if guide is not None and self.guides is not None:
            self.guides.matcher(guide)  # GuideError: cannot compile, or admits no answer
        if thinking and not self.think:
            raise NoThinking("thinking was requested, but this deployment was built without AF3's think/ adapter "
                             "(build from a checkpoint that has think/, without --no-think)")
        if self.device is None:  # also the GPU target's fallback, whose inputs may still arrive on the GPU
            windows = [int(w) for w in io.host_array(pb, r, c.AUDIO_WINDOWS).reshape(-1)]
            conv = self.conversation(r, len(windows), thinking)
            ids, table = self.builder.build_conversation(conv, io.host_array(pb, r, c.AUDIO_EMBEDS),
                                                         io.host_array(pb, r, c.INPUT_FEATURES_MASK), windows)
        else:  # inputs may sit on the GPU (FORCE_CPU_ONLY_INPUT_TENSORS "no"); the table is made and stays there
            embeds, mask, windows_t = (io.device_tensor(pb, r, n)
                                       for n in (c.AUDIO_EMBEDS, c.INPUT_FEATURES_MASK, c.AUDIO_WINDOWS))
            conv = self.conversation(r, int(windows_t.numel()), thinking)
            ids, table = self.device_table.build(self.builder, conv, self.device, embeds, mask, windows_t)
        n_rows = len(table)
        # for postprocess, in one write: the prompt length (usage); a stream's max_tokens (its last response is known
        # by its token count, or is empty); ignore_eos (an end id then stays in the text, as the decoder kept it)
        self.ctx.update(r.request_id(), prompt_tokens=len(ids),
                        **({c.MAX_TOKENS: sampling.max_tokens} if sampling.stream else {}),
                        **({c.IGNORE_EOS: True} if sampling.ignore_eos else {}))
        extra = None
        if self.limits.prompt_table_extra_ids:  # [L] u64, from the window keys preprocess computed (not from the table)
            keys = io.tensor(pb, r, c.AUDIO_DIGEST)
            if keys is None:
                raise PromptError(f"{c.AUDIO_DIGEST} is required with prompt_table_extra_ids (preprocess sends it)")
            mask = io.host_array(pb, r, c.INPUT_FEATURES_MASK)  # [W, T]: each window's valid rows
            audio_windows = [int(w) for w in io.host_array(pb, r, c.AUDIO_WINDOWS).reshape(-1)]
            extra = table_extra_ids(ids, keys, self.limits.vocab_size, window_rows(mask, audio_windows))
        if n_rows == 0:  # text-only: a one-row table that no id addresses keeps the tensor well-formed
            table = np.zeros((1, self.limits.hidden_size), np.float32)

        def one(name, value, dtype):
            return pb.Tensor(name, np.array([[value]], dtype=dtype))

        outputs = [
            pb.Tensor(c.INPUT_IDS, ids[None]),  # [1, L]
            one(c.INPUT_LENGTHS, len(ids), np.int32),
            one(c.REQUEST_OUTPUT_LEN, sampling.max_tokens, np.int32),
            one(c.END_ID, -1 if sampling.ignore_eos else self.limits.end_id, np.int32),  # -1: no end id
            one(c.PAD_ID, self.limits.pad_id, np.int32),
            one(c.STREAMING, sampling.stream, np.bool_),
            one(c.RUNTIME_TOP_K, sampling.top_k, np.int32),
            one(c.RUNTIME_TOP_P, sampling.top_p, np.float32),
            one(c.TEMPERATURE, sampling.temperature, np.float32),
            one(c.REPETITION_PENALTY, sampling.repetition_penalty, np.float32),
            one(c.SEED, sampling.seed, np.uint64),
            one(c.PROMPT_VOCAB_SIZE, max(n_rows, 1), np.int32),
            one(c.MIN_TOKENS, sampling.min_tokens, np.int32),
            _table_tensor(table, self.limits.dtype),  # [1, N, H]
        ]
        if self.limits.stop_ids and not sampling.ignore_eos:  # [1, 2, L]: the other end ids, one stop word each
            outputs.append(pb.Tensor(c.STOP_WORDS_LIST, stop_words_list([i] for i in self.limits.stop_ids)[None]))
        if extra is not None:
            outputs.append(pb.Tensor(c.PROMPT_TABLE_EXTRA_IDS, extra[None]))  # [1, L]
        if thinking and self.think_task_id is not None:  # absent for base requests: the decoder then runs without the adapter
            outputs.append(one(c.LORA_TASK_ID, self.think_task_id, np.uint64))
        if guide is not None:  # [1, 1] each: one string per tensor, as the backend reads them
            outputs += [one(c.GUIDED_DECODING_GUIDE_TYPE, guide.kind.encode(), np.object_),
                        one(c.GUIDED_DECODING_GUIDE, guide.text.encode(), np.object_)]
        return pb.InferenceResponse(outputs)

    @staticmethod
    def conversation(r, n_clips: int, thinking: bool = False) -> conversation.Conversation:
        prompt, system, messages = (io.text(pb, r, n) for n in (c.TEXT_INPUT, c.SYSTEM_PROMPT, c.MESSAGES))
        if messages is not None:
            if prompt is not None or system is not None:
                raise PromptError("send either messages or text_input (+ system_prompt), not both")
            conv = conversation.parse(messages, n_clips)
        elif prompt is None:
            raise PromptError("text_input or messages is required")
        else:
            conv = conversation.shorthand(prompt, system, n_clips)
        # a thinking request's last user turn ends with AF3's think suffix (conversation.with_think_suffix)
        return conversation.with_think_suffix(conv) if thinking else conv
