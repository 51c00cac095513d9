"""megatron-core GPT datasets over our indexed files (or mock data), for the training loop.

:func:`build_gpt_datasets` is the one call the trainer makes. It wraps megatron-core 0.16.1's
``BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, GPTDatasetConfig(...)).build()``:

* samples are dicts of ``tokens``, ``labels`` (``tokens`` shifted by one), ``loss_mask`` (1.0 except on
  padding) and ``position_ids`` (0..seq_length-1): ``int64``/``float32`` tensors of length ``seq_length``,
  no ``attention_mask`` (the attention kernels build the causal mask);
* documents are concatenated with their EOS and cut into ``seq_length + 1``-token windows, so a sample
  crosses document boundaries and positions do not restart at EOS (Megatron-LM's defaults:
  ``reset_position_ids = reset_attention_mask = eod_mask_loss = False``). With ``reset_position_ids``
  positions restart after each EOS, with ``eod_mask_loss`` the EOS tokens are out of the loss, and
  ``reset_attention_mask`` is recorded in the dataset's config for the trainer, which masks attention by
  document (``megatron/documents.py``) instead of megatron's dense [s, s] mask;
* the document / sample / shuffle indices are cached as ``.npy`` files under ``cache_dir``; rank 0 builds
  them, the others wait at a barrier and load them. Beside read-only data the cache goes to a writable
  place instead (:func:`index_cache_dir`), and rank 0 builds under an exclusive lock on the cache
  directory, so jobs that start together never read each other's half-written files
  (:func:`_index_cache_lock`).

megatron-core needs a tokenizer object only for its ``vocab_size`` (token dtype, mock data), ``eod`` (mock
data; masks) and ``unique_identifiers`` (part of the cache key): :class:`DatasetTokenizer` is exactly that,
made from the ids :func:`build_gpt_datasets` is given (a
:class:`~megatron_resonance.data.tokenizer.Tokenizer`'s ``vocab_size`` and ``eos_id``, or a model's).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import warnings
from collections import OrderedDict
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy

from megatron_resonance.cli import check_output_dir, one_line
from megatron_resonance.errors import UserError

# megatron.core, torch and this package's megatron layer (whose import checks megatron-core's
# release) are imported inside the functions that build datasets: the data tools run without them;
# data.checks is imported there too, since it imports this module (a cycle at module level).

Prefixes = Union[str, Sequence[str]]

#: in each index cache directory: rank 0 of a job holds an exclusive ``flock`` on it while it builds
INDEX_CACHE_LOCK = ".lock"


class DatasetTokenizer:
    """The part of a Megatron tokenizer that megatron-core's GPT datasets read.

    Args:
        vocab_size: number of token ids (picks the token dtype; mock data draws ids below it).
        eod: end-of-document id, the EOS the preprocessor appended after each document.
        name: identifies the tokenizer in the dataset cache key (e.g. the model path).
    """

    def __init__(self, vocab_size: int, eod: int, name: str = ""):
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("name", name), ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    @property
    def eos(self) -> int:
        return self.eod

    def __repr__(self) -> str:
        return f"DatasetTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


def _prefix_list(prefixes: Optional[Prefixes]) -> Optional[List[str]]:
    if prefixes is None:
        return None
    return [prefixes] if isinstance(prefixes, (str, os.PathLike)) else [str(p) for p in prefixes]


def _blend(prefixes: Optional[Prefixes]):
    """Megatron-LM ``--data-path`` syntax: ``[P1, P2]`` or ``[W1, P1, W2, P2]`` -> (prefixes, weights)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import get_blend_from_list

    items = _prefix_list(prefixes)
    if not items:
        return None
    blend = get_blend_from_list([str(p) for p in items])
    for prefix in blend[0]:
        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(f"indexed dataset not found: {prefix}.bin / {prefix}.idx")
    return blend


def _index_fingerprint(prefixes: Sequence[str]) -> str:
    """Hash of the ``.idx`` files (document lengths): megatron's cache key names the prefix but not its
    contents, so a dataset re-made under the same prefix would otherwise reuse stale indices."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        digest.update(os.path.abspath(prefix).encode() + b"\0")
        with open(prefix + ".idx", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _say(line: str) -> None:
    from megatron_resonance.megatron.distributed import print_rank0

    print_rank0(line)


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_resonance", "index-cache")


def writable(path: str) -> bool:
    """A directory this process can write in, or could create (``cli.check_output_dir``)."""
    try:
        check_output_dir(path, "")
        return True
    except UserError:
        return False


def index_cache_dir(first_prefix: str, fallback: Optional[str] = None) -> str:
    """Where the index cache goes when no ``cache_dir`` is given: ``index-cache`` beside the data, or, when
    the data is on a read-only place (a shared dataset mount), ``fallback`` (the trainer's ``<save>/index-cache``:
    shared storage that every rank of a multi-node job sees), else the user's cache directory
    (``$XDG_CACHE_HOME`` or ``~/.cache``, ``megatron_resonance/index-cache``). Every rank decides alike
    (``os.access`` on the same paths); rank 0 prints one line when it falls back. UserError with one line
    when no place can be written."""
    beside = os.path.join(os.path.dirname(os.path.abspath(first_prefix)), "index-cache")
    if writable(beside):
        return beside
    for place in filter(None, (fallback, _user_cache_dir())):
        if writable(place):
            _say(
                f"[data] {os.path.dirname(beside)} is not writable: the dataset index cache goes to {place} "
                "(--data-cache-path sets it)"
            )
            return place
    raise UserError(
        f"{os.path.dirname(beside)} is not writable and neither is "
        f"{fallback or _user_cache_dir()}: give --data-cache-path a writable directory"
    )


def _drop_unreadable(cache_dir: str) -> None:
    """Remove cached ``.npy`` files that do not load (a job stopped while writing one leaves it truncated:
    megatron counts it as a cache hit and fails to map it), with every file of the same hash prefix (the
    same dataset's description and other indices), so megatron builds them again."""
    for name in sorted(os.listdir(cache_dir)):
        if not name.endswith(".npy") or not os.path.exists(os.path.join(cache_dir, name)):
            continue
        try:
            numpy.load(os.path.join(cache_dir, name), mmap_mode="r", allow_pickle=True)
        except (ValueError, EOFError, OSError) as e:
            key = name.split("-", 1)[0] + "-"
            _say(f"[data] {os.path.join(cache_dir, name)} is damaged ({one_line(e)}): building its indices again")
            for other in os.listdir(cache_dir):
                if other.startswith(key):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(cache_dir, other))


@contextlib.contextmanager
def _index_cache_lock(cache_dir: Optional[str]) -> Iterator[None]:
    """Held around megatron's build on rank 0 (or a process without torch.distributed): an exclusive ``flock``
    on ``cache_dir/INDEX_CACHE_LOCK``. megatron decides "cache hit" by the files' existence and writes them
    in place, so two jobs building one cache at once would read each other's half-written files; under the
    lock only one job at a time looks for a miss and writes, and damaged files are removed first. The other
    ranks of a job load only after their rank 0 passed megatron's barrier, inside its locked build, so they
    read complete files; a file already complete is never written again."""
    import torch.distributed as dist

    if not cache_dir or (dist.is_initialized() and dist.get_rank() != 0):
        yield
        return
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, INDEX_CACHE_LOCK), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"[data] waiting for another job building the dataset index cache in {cache_dir}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        _drop_unreadable(cache_dir)
        yield  # closing the file releases the lock


def build_gpt_datasets(
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: Optional[int],
    vocab_size: int,
    eod_id: int,
    tokenizer_name: str = "",
    train_data_prefix: Optional[Prefixes] = None,
    valid_data_prefix: Optional[Prefixes] = None,
    data_prefix: Optional[Prefixes] = None,
    split: str = "98,2,0",
    mock: bool = False,
    cache_dir: Optional[str] = None,
    fallback_cache_dir: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> Tuple[Optional[object], Optional[object]]:
    """Build the train and validation ``GPTDataset`` (``MockGPTDataset`` when ``mock``).

    Collective when torch.distributed is initialized: call it on every rank, at the same point.

    Data, one of three ways:

    * ``train_data_prefix`` (+ optional ``valid_data_prefix``): separate indexed datasets per split,
      as ``tools/preprocess_data.py`` writes them for the embedded corpus (Megatron-LM's
      ``--train-data-path`` / ``--valid-data-path``);
    * ``data_prefix`` + ``split``: one blend divided into train/valid/test by document ranges
      (Megatron-LM's ``--data-path`` / ``--split``; the test part is not built, nor the validation part
      when ``valid_samples`` is 0);
    * ``mock=True``: megatron-core's synthetic documents (ids ``1, 2, ... , len-1, eod``), no files.

    A prefix is ``path/name`` of ``path/name.bin`` + ``path/name.idx``; a list is a blend, either
    ``[P1, P2]`` (weighted by size) or ``[W1, P1, W2, P2]`` as on Megatron-LM's command line.

    Args:
        seq_length: tokens per sample (each sample reads ``seq_length + 1`` tokens for the labels).
        seed: seeds the document and sample shuffles (same on every rank).
        train_samples: samples the train dataset must provide (``iterations * global_batch_size``);
            documents are repeated over as many epochs as needed.
        valid_samples: samples for validation (``evals * eval_iters * global_batch_size``); None: one
            epoch; 0 or no validation data: no validation dataset.
        vocab_size: number of token ids (the tokenizer's, or the model's); picks the token dtype.
        eod_id: the end-of-document id the preprocessor appended (the tokenizer's ``eos_id``).
        tokenizer_name: names the tokenizer in the index cache key (e.g. its file name).
        cache_dir: directory for the cached index ``.npy`` files (created by rank 0), which go into a
            subdirectory named by a hash of the ``.idx`` files, so re-made data never meets stale
            indices. Default: ``index-cache`` next to the first train (or blended) prefix, or where that
            is not writable ``fallback_cache_dir`` or the user's cache directory (:func:`index_cache_dir`).
            With ``mock``, indices are cached only if ``cache_dir`` is given. Rank 0 builds under an
            exclusive lock on the directory (:func:`_index_cache_lock`): any number of jobs may share it.
        fallback_cache_dir: the index cache's place when ``cache_dir`` is None and the data's directory is
            not writable; should be storage every rank sees (the trainer gives ``<save>/index-cache``).
        is_built_on_rank: whether this rank builds datasets (others get None). Default: every rank,
            which is cheap (the ``.bin`` is memory-mapped) and lets each rank read its own batches.
            Megatron-LM builds only on TP rank 0 of the first and last pipeline stages and
            broadcasts batches over TP; pass such a predicate to do the same. Rank 0 must build.
        reset_position_ids, reset_attention_mask, eod_mask_loss: Megatron-LM's document-masking flags, as
            megatron's dataset reads them: ``position_ids`` restart after every EOD; (only recorded in the
            dataset's config: no dense mask is built, the trainer derives each token's document from the
            EODs); ``loss_mask`` is 0 on EOD tokens.

    Returns:
        ``(train, valid)``: megatron ``GPTDataset`` objects (``len()`` >= the requested samples;
        ``dataset[i]`` is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``), valid
        None when there is no validation data.

    Raises:
        ValueError: inconsistent arguments. FileNotFoundError: a prefix without ``.bin``/``.idx``.
        UserError: no writable place for the index cache.
    """
    with warnings.catch_warnings():  # megatron.core's import warns about missing TE/Apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    from megatron_resonance.data.checks import split_matrix
    from megatron_resonance.megatron import compat

    if mock:
        compat.mock_tokens_within_vocabulary()

    dataset_tokenizer = DatasetTokenizer(vocab_size, eod_id, tokenizer_name)

    # -- data source ------------------------------------------------------------------------------------
    if seq_length < 1 or train_samples < 1:
        raise ValueError(f"seq_length and train_samples must be >= 1, got {seq_length}, {train_samples}")
    sources = [mock, data_prefix is not None, train_data_prefix is not None]
    if sum(map(bool, sources)) != 1:
        raise ValueError("pass exactly one of mock=True, data_prefix, train_data_prefix")
    if valid_data_prefix is not None and train_data_prefix is None:
        raise ValueError("valid_data_prefix needs train_data_prefix")
    want_valid = valid_samples is None or valid_samples > 0
    blend = blend_per_split = None
    if data_prefix is not None:
        blend = _blend(data_prefix)
    elif train_data_prefix is not None:
        valid_blend = _blend(valid_data_prefix) if want_valid else None
        blend_per_split = [_blend(train_data_prefix), valid_blend, None]
    if not mock:
        if cache_dir is None:
            cache_dir = index_cache_dir((blend or blend_per_split[0])[0][0], fallback_cache_dir)
        used = [p for b in ([blend] if blend else blend_per_split) if b for p in b[0]]
        cache_dir = os.path.join(cache_dir, _index_fingerprint(used))

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split if blend is not None else None,
        path_to_cache=cache_dir,
        tokenizer=dataset_tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # no dense [s, s] mask: the attention takes documents from the EODs
        mmap_bin_files=True,
    )
    if blend is not None:  # megatron builds every part its split names: only those we read
        config.split_matrix = split_matrix(split, (True, want_valid, False))
    sizes = [train_samples, valid_samples if want_valid else 0, 0]
    cls = MockGPTDataset if mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank or (lambda: True), config)
    with _index_cache_lock(cache_dir):
        train, valid, _ = builder.build()
    return train, (valid if want_valid else None)
