"""Python API: load a checkpoint once, then score, embed and generate.

    from evo2_recipe.inference.api import Evo2
    evo = Evo2.from_checkpoint("results/evo2/checkpoints")          # single process; torchrun for TP/CP
    evo.score(["ACGT..."], reduce="mean", average_reverse_complement=True)
    evo.embed(["ACGT..."], layer=-2)
    evo.generate(["ATGGTT"], n_tokens=100, temperature=1.0, top_k=4)

Sequences are upper-cased before tokenization (training upper-cases every input token, tags included); any character
the tokenizer encodes is accepted - nucleotides, IUPAC codes and phylogenetic tags such as ``|d__Bacteria;...|`` -
and anything else is refused with its position. With ``prepend_bos`` the
EOD id (0, the document separator the model was trained with) is put in front of every sequence so the first base is
scored too; the reference's ``--prepend-bos`` does the same.
"""

from __future__ import annotations

import torch

from evo2_recipe.data.preprocess import reverse_complement
from evo2_recipe.inference import scoring
from evo2_recipe.inference.generation import SamplingParams, generate
from evo2_recipe.inference.graphed import GraphedForward
from evo2_recipe.inference.loading import LoadedModel, load_for_inference


class Evo2:
    def __init__(self, loaded: LoadedModel, ckpt_dir: str, parallel: dict, cuda_graph: bool = True):
        from megatron.core import parallel_state

        self._loaded = loaded
        self.ckpt_dir = ckpt_dir
        self._parallel = parallel
        self.tokenizer = loaded.tokenizer
        single_rank = (parallel_state.get_tensor_model_parallel_world_size() == 1
                       and parallel_state.get_context_parallel_world_size() == 1)
        on_gpu = next(loaded.model.parameters()).is_cuda
        self._graphs = GraphedForward(loaded.model) if cuda_graph and single_rank and on_gpu else None

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, *, tp: int = 1, cp: int = 1, sequence_parallel=None,
                        mixed_precision_recipe: str | None = None, vortex_style_fp8: bool | None = None,
                        use_fused_kernels: bool | None = None, seed: int = 1234,
                        tokenizer_path: str | None = None, model_overrides: dict | None = None,
                        cuda_graph: bool = True) -> Evo2:
        """Initialise (or reuse) the process group and load ``ckpt_dir``. CPU mode is used when no GPU is present.

        ``mixed_precision_recipe``: a Megatron-Bridge recipe name (``bf16_mixed``,
        ``bf16_with_fp8_current_scaling_mixed``, ...) or ``fp32``; default bf16_mixed on GPU, fp32 on CPU.
        ``use_fused_kernels``: True runs the fused Triton kernels (CUDA), None keeps the checkpoint's choice.
        ``model_overrides``: provider fields to change (``num_layers``, ``hybrid_override_pattern``,
        ``seq_len_interpolation_factor``); the checkpoint must still cover the model exactly.
        ``cuda_graph``: on one GPU (TP=1, CP=1), a batch shape of at most 65,536 tokens seen a second time is captured
        and from then on replayed as a CUDA graph (``graphed.GraphedForward``); False runs every forward eagerly.
        """
        from evo2_recipe.compat import cpu as cpu_mode
        from evo2_recipe.utils.distributed import init_distributed

        cpu = cpu_mode.enter_runtime(None)  # an entry point: library imports patch nothing
        init_distributed(tp=tp, cp=cp, seed=seed, cpu=cpu)
        parallel = dict(tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                        mixed_precision_recipe=mixed_precision_recipe, vortex_style_fp8=vortex_style_fp8, use_fused_kernels=use_fused_kernels,
                        tokenizer_path=tokenizer_path, model_overrides=model_overrides)
        return cls(load_for_inference(ckpt_dir, **parallel), ckpt_dir, parallel, cuda_graph)

    @property
    def model(self):
        return self._loaded.model

    def tokenize(self, seqs: list[str], *, prepend_bos: bool = False) -> list[torch.Tensor]:
        out = []
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence #{i} is empty")
            ids = torch.from_numpy(self.tokenizer.tokenize_checked(s.upper(), f"sequence #{i}"))
            out.append(torch.cat([torch.tensor([self.tokenizer.eod]), ids]) if prepend_bos else ids)
        return out

    def _pad(self, ids: list[torch.Tensor], min_length: int | None = None):
        """Right-pad to a length the parallel layout handles (causal model: padding never changes real positions)."""
        from megatron.core import parallel_state

        cp = parallel_state.get_context_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        sp = getattr(self._loaded.provider, "sequence_parallel", False)
        multiple = (2 * cp if cp > 1 else 1) * (tp if sp else 1)
        return scoring.pad_batch(ids, self.tokenizer.eod, max(min_length or 0, scoring.cp_min_length(cp)), multiple)

    def logits(self, seqs: list[str], *, prepend_bos: bool = False, min_length: int | None = None,
               fp32: bool = True):
        """``(logits (B, L, V), tokens (B, L), mask (B, L))`` for a batch of sequences; logits in fp32, or in the
        model's dtype with ``fp32=False``."""
        ids = self.tokenize(seqs, prepend_bos=prepend_bos)
        tokens, mask = self._pad(ids, min_length)
        if prepend_bos:
            mask[:, 0] = 0
        return scoring.forward_full(self.model, tokens, fp32=fp32, graphs=self._graphs), tokens, mask

    def score(self, seqs: list[str], *, reduce: str = "mean", average_reverse_complement: bool = False,
              prepend_bos: bool = False, batch_size: int = 8, mask_phylogenetic_tags: bool = False) -> list:
        """Log-likelihood of each sequence: a float (``sum``/``mean``) or a per-position tensor (``per_token``).

        ``mask_phylogenetic_tags`` leaves positions predicting a taxonomy-tag token out (0 in ``per_token``, not
        counted in ``mean``), as training's loss mask does.
        """
        results = []
        for i in range(0, len(seqs), batch_size):
            results += self._score_batch(seqs[i:i + batch_size], reduce, prepend_bos, mask_phylogenetic_tags)
        if average_reverse_complement:
            if reduce == "per_token":
                raise ValueError("average_reverse_complement needs reduce='sum' or 'mean'")
            rc = self.score([reverse_complement(s.upper()) for s in seqs], reduce=reduce, prepend_bos=prepend_bos,
                            batch_size=batch_size, mask_phylogenetic_tags=mask_phylogenetic_tags)
            results = [(a + b) / 2 for a, b in zip(results, rc)]
        return results

    def _score_batch(self, seqs, reduce, prepend_bos, mask_tags=False):
        logits, tokens, mask = self.logits(seqs, prepend_bos=prepend_bos, fp32=False)  # fp32 only chunk-wise
        per_token, scored = scoring.token_log_probs(logits, tokens, mask)
        counted = scored
        if mask_tags:
            from evo2_recipe.data.tag_masking import mask_phylogenetic_tags

            counted = scored & mask_phylogenetic_tags(tokens)[:, 1:].to(scored.device).bool()
            per_token = per_token * counted
        red = scoring.reduce_log_probs(per_token, counted, reduce)
        if reduce == "per_token":
            return [red[b, :int(scored[b].sum())].cpu() for b in range(len(seqs))]
        return red.cpu().tolist()

    def embed(self, seqs: list[str], *, layer: int = -1, prepend_bos: bool = False) -> list[torch.Tensor]:
        """Output of layer ``layer`` (negative counts from the end; before the final norm): ``(L_i, H)`` each."""
        ids = self.tokenize(seqs, prepend_bos=prepend_bos)
        tokens, mask = self._pad(ids)
        # the loaded model (for predict_evo2 --embedding-layer: its first layers only)
        hidden = scoring.forward_full(self.model, tokens, hidden_layer=layer, graphs=self._graphs)
        return [hidden[b, :int(mask[b].sum())].cpu() for b in range(len(seqs))]

    def generate(self, prompts: list[str], n_tokens: int = 100, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, seed: int | None = None, max_seq_length: int | None = None,
                 stop_at_eod: bool = True, max_batch_size: int | None = None, on_text=None,
                 cuda_graph: bool = True, prompt_segmentation_threshold: int | None = None) -> list[dict]:
        """Sample continuations; each result has ``text``, ``tokens``, ``log_probs`` and ``finish_reason``.

        ``max_batch_size`` sequences decode together (default: all); finished ones hand their slot to the next
        prompt. ``on_text(prompt_index, text)`` receives new text as it is produced (streaming).
        """
        if getattr(self._loaded.provider, "sequence_parallel", False):
            raise ValueError("generation feeds one token per step, which sequence parallelism cannot split; load "
                             "with Evo2.from_checkpoint(..., sequence_parallel=False) (infer_evo2 does)")
        ids = [t.tolist() for t in self.tokenize(prompts)]
        params = SamplingParams(max_new_tokens=n_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                stop_at_eod=stop_at_eod)
        stream = None if on_text is None else (lambda i, toks: on_text(i, self.tokenizer.detokenize(toks)))
        out = generate(self.model, ids, params, eod_id=self.tokenizer.eod, vocab_size=self.tokenizer.vocab_size,
                       max_seq_length=max_seq_length, max_batch_size=max_batch_size, on_tokens=stream,
                       cuda_graph=cuda_graph, prompt_segmentation_threshold=prompt_segmentation_threshold)
        for r in out:
            r["text"] = self.tokenizer.detokenize(r["tokens"])
        return out
