"""``reweighted_label_smoothed_cross_entropy``: fairseq's label-smoothed cross entropy that can also
return per-sentence losses and the decoder's internal states for the teacher.

Validation (``forward``) is exactly fairseq's ``label_smoothed_cross_entropy``; the training path
(:meth:`per_sentence`) is used by the ``reweighted_translation`` task.
"""

import inspect
from typing import Dict, List, NamedTuple, Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.models import FairseqDecoder, FairseqIncrementalDecoder
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)


class SentenceOutput(NamedTuple):
    loss: torch.Tensor  # [B] summed label-smoothed loss per sentence (with autograd graph)
    nll: torch.Tensor  # [B] summed token NLL per sentence
    token_nll: torch.Tensor  # [B, T] token NLL (0 at padding), detached
    mask: torch.Tensor  # [B, T] non-pad target positions
    states: List[torch.Tensor]  # per exposed decoder layer: [B, C] mean over non-pad positions, detached
    net_output: tuple
    encoder_out: Optional[dict] = None  # the encoder's output (None under torch DDP), for source_contrast


def decoder_layers(features: torch.Tensor, extra) -> List[torch.Tensor]:
    """Decoder states a model exposes, as ``[B, T, C]`` tensors, from its first layer to the last.

    Transformers expose every layer's output in ``extra["inner_states"]`` (``[T, B, C]``; index 0
    is the embedding layer, which we skip); other decoders (LSTM, fconv) expose only their final
    features. The last entry is always the features the output projection sees.
    """
    inner = extra.get("inner_states") if isinstance(extra, dict) else None
    layers = [h.transpose(0, 1) for h in inner[1:-1]] if inner is not None and len(inner) > 1 else []
    return layers + [features]


def check_model(model):
    """The decoder of ``model``, if it is an encoder-decoder model whose decoder implements
    ``extract_features`` (fairseq's base decoders declare it but raise NotImplementedError)."""
    model = _inner(model)
    decoder = getattr(model, "decoder", None)
    impl = getattr(type(decoder), "extract_features", None)
    if decoder is None or not hasattr(model, "encoder") or impl is None or impl in _ABSTRACT_EXTRACT_FEATURES:
        name = type(_inner(model)).__name__
        what = f"{name} has no encoder-decoder structure" if decoder is None or not hasattr(model, "encoder") else \
            f"the decoder of {name} ({type(decoder).__name__}) does not implement extract_features"
        raise TypeError(
            f"--task reweighted_translation needs an encoder-decoder model whose decoder implements "
            f"extract_features (per-sentence losses and the deep teacher's inputs come from it); {what}. Use an "
            f"--arch whose decoder does (the transformer and lstm families, e.g. --arch transformer), or implement "
            f"extract_features(prev_output_tokens, encoder_out) -> (features, extra) for this decoder"
        )
    return decoder


def num_decoder_layers(model, sample) -> int:
    """How many layers :func:`decoder_layers` exposes for ``model`` (one small forward of the first pair)."""
    decoder, model = check_model(model), _inner(model)
    net_input = sample["net_input"]
    with torch.no_grad():
        enc = model.encoder(net_input["src_tokens"][:1], src_lengths=net_input["src_lengths"][:1])
        features, extra = decoder.extract_features(net_input["prev_output_tokens"][:1], encoder_out=enc)
    return len(decoder_layers(features, extra))


def _torch_ddp(model) -> bool:
    """Is ``model`` (possibly behind fairseq's ModuleProxyWrapper) torch's DistributedDataParallel?"""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return True
        if not (hasattr(model, "module") and isinstance(model.module, torch.nn.Module)):
            return False
        model = model.module


def _inner(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


_ABSTRACT_EXTRACT_FEATURES = (FairseqDecoder.extract_features, FairseqIncrementalDecoder.extract_features)


@register_criterion("reweighted_label_smoothed_cross_entropy", dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class ReweightedLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def per_sentence(self, model, sample, layers: Optional[List[int]] = None) -> SentenceOutput:
        """One forward pass giving per-sentence losses and (optionally) pooled decoder states.

        The computation is the one ``model(**net_input)`` does for an encoder-decoder model
        (encoder, ``decoder.extract_features``, ``decoder.output_layer``), split so the decoder
        features are available. ``layers``: indices into :func:`decoder_layers` (``None``: no
        states are pooled).
        """
        decoder = check_model(model)
        net_input = sample["net_input"]
        if _torch_ddp(model):
            # under torch's DistributedDataParallel the forward must go through the wrapper, or the
            # gradients are not all-reduced: ask for the features and project them here
            if "features_only" not in inspect.signature(decoder.forward).parameters:
                raise ValueError(
                    f"{type(decoder).__name__}.forward has no features_only argument, which reweighted_translation "
                    "needs under --ddp-backend pytorch_ddp (the default); use --ddp-backend legacy_ddp")
            features, extra = model(**net_input, features_only=True)
        else:
            encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
            features, extra = decoder.extract_features(net_input["prev_output_tokens"], encoder_out=encoder_out)
        net_output = (decoder.output_layer(features), extra)

        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        loss, nll = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=False)
        bsz = sample["target"].size(0)
        loss, nll = loss.view(bsz, -1), nll.view(bsz, -1)
        mask = target.view(bsz, -1).ne(self.padding_idx)

        states: List[torch.Tensor] = []
        if layers:
            available = decoder_layers(features, extra)
            denom = mask.sum(1, keepdim=True).clamp_min(1).to(features.dtype)
            if self.ignore_prefix_size > 0:
                available = [h[:, self.ignore_prefix_size :] for h in available]
            for i in layers:
                h = available[i].detach()
                states.append((h * mask.unsqueeze(-1).to(h.dtype)).sum(1) / denom)
        return SentenceOutput(loss.sum(1), nll.sum(1), nll.detach(), mask, states, net_output,
                              None if _torch_ddp(model) else encoder_out)

    def source_contrast(self, model, sample, out: Optional[SentenceOutput] = None, parts: bool = False):
        """``[B]``: how much each target's per-token NLL rises when the decoder reads another sentence's
        source (the batch's sources rotated by one; batches are sorted by length, so it is a source of
        about the same length). A pair whose target does not translate its source (misaligned, random
        target) gains little from it. Both NLLs come from one extra forward of the whole model in eval mode
        (no dropout, no graph): dropout noise in the training pass's NLL blurs the contrast (measured on
        Multi30k: AUC 0.944 with it, 0.975 without). ``out``: the batch's :meth:`per_sentence` in eval mode, whose
        pass is then reused (in training mode, or without it, the contrast runs its own passes). ``parts``: the
        ``[B, 2]`` per-token NLLs given (another source, its own) instead of their difference."""
        inner = _inner(model)
        net_input = sample["net_input"]
        target = sample["target"][:, self.ignore_prefix_size:]
        bsz = target.size(0)
        if bsz < 2:
            return torch.zeros((bsz, 2) if parts else bsz, device=target.device)
        mask = target.ne(self.padding_idx)
        was_training = inner.training
        # in eval mode (scoring) the pass that gave `out` had no dropout: only the rotated sources are new
        reuse = not was_training and out is not None and out.encoder_out is not None
        try:
            with torch.no_grad():
                inner.eval()
                encoder_out = out.encoder_out if reuse else inner.encoder(
                    net_input["src_tokens"], src_lengths=net_input["src_lengths"])
                own = torch.arange(bsz, device=target.device)
                sums = []
                # one decoder pass per source order, not one of the doubled batch: the [B, T, vocab] log-probs of
                # one pass are the peak memory (doubled, they were most of the default's extra memory)
                for order in ([torch.roll(own, 1)] if reuse else [None, torch.roll(own, 1)]):
                    reordered = encoder_out if order is None else inner.encoder.reorder_encoder_out(encoder_out, order)
                    features, extra = inner.decoder.extract_features(net_input["prev_output_tokens"],
                                                                     encoder_out=reordered)
                    lprobs = inner.get_normalized_probs((inner.decoder.output_layer(features), extra), log_probs=True)
                    del features
                    if self.ignore_prefix_size > 0:
                        lprobs = lprobs[:, self.ignore_prefix_size:]
                    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask.to(lprobs.dtype)
                    del lprobs
                    sums.append(nll.sum(1))
                nll = torch.cat(sums)
        finally:
            inner.train(was_training)
        own_nll = out.nll.detach().to(nll.dtype) if reuse else nll[:bsz]
        ntok = mask.sum(1).clamp_min(1).to(nll.dtype)
        if parts:
            return torch.stack([nll[-bsz:] / ntok, own_nll / ntok], dim=1)
        return (nll[-bsz:] - own_nll) / ntok

    def logging_output(self, model, sample, out: SentenceOutput, weights: torch.Tensor) -> Dict[str, float]:
        """fairseq's logging dict for a weighted batch: ``loss`` is the weighted objective,
        ``nll_loss`` stays unweighted so perplexities compare across methods."""
        log = {
            "loss": (weights.to(out.loss.dtype) * out.loss).sum().data,
            "nll_loss": out.nll.sum().data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample["target"].size(0) if self.sentence_avg else sample["ntokens"],
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, out.net_output, sample)
            log["n_correct"], log["total"] = n_correct.item(), total.item()
        return log
