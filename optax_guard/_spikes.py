"""`skip_spikes`: skip steps whose gradient norm or loss is an outlier."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_guard import _args
from optax_guard import _eager
from optax_guard import _monitor
from optax_guard import _skip
from optax_guard import _stats


class Window(NamedTuple):
  """A fixed on-device window of the last accepted values of a signal."""
  values: jax.Array  # f32[W] ring buffer of accepted values.
  # i32[] values accepted so far, the write head; past the window it counts
  # on modulo the window's size, in [size, 2 * size), so that it never stops
  # at int32's maximum (every reader takes `min(n, size)` or `n % size`).
  num_accepted: jax.Array


def window_init(size: int) -> Window:
  return Window(jnp.zeros((size,), jnp.float32), jnp.zeros((), jnp.int32))


def check_history(window: Window, size: int, factory: str,
                  argument: str) -> None:
  """Raises unless `window` holds `size` values: a history of another size
  would make the baseline of another span (never ready, if shorter than the
  warm-up). Static: free per step."""
  held = window.values.shape[-1]
  if held != size:
    raise ValueError(
        f"The state's history holds {held} values, but this `{factory}` was "
        f"built with {argument}={size}; {_args.OTHER_CONFIGURATION}")


def window_push(window: Window, value: jax.Array, accept: jax.Array) -> Window:
  """Appends `value` where `accept` holds; the oldest value drops out."""
  size = window.values.shape[0]
  slot = window.num_accepted % size
  # A select, not `.at[slot].set`: after expanding a scatter, XLA runs its
  # simplifier over the whole step again (three more rounds when compiled).
  # (Positions in int32, as the counts, also in 64-bit mode.)
  at_slot = jnp.arange(size, dtype=jnp.int32) == slot
  values = jnp.where(at_slot & accept, value, window.values)
  n = window.num_accepted
  head = jnp.where(n < size - 1, n + 1, size + (n - (size - 1)) % size)
  return Window(values, jnp.where(accept, head, n))


def min_count(window: int, warmup_steps: Any) -> Any:
  """The accepted values a history needs before it can call a spike.

  Between 2 and `window`: a value changed in `optax.inject_hyperparams`'
  state after `init` (which checks it) is traced and cannot be refused;
  above the window (which a history never exceeds) it would switch spike
  skipping off for good, and below 2 a history of one value (std 0) or
  none (threshold 0) would make every step a spike.
  """
  if warmup_steps is None:
    return max(2, window // 2)
  if isinstance(warmup_steps, int):
    return warmup_steps
  return jnp.clip(warmup_steps, 2, window)


class Baseline(NamedTuple):
  """What a step is judged against: its history's mean and std, and the
  threshold `mean + sigma * std` (+Inf until the history has `min_count`)."""
  mean: jax.Array       # f32[]
  std: jax.Array        # f32[] the population standard deviation.
  threshold: jax.Array  # f32[]


def window_baseline(window: Window, sigma: Any, min_count: Any) -> Baseline:
  """The mean, std and threshold of the accepted values in `window`."""
  size = window.values.shape[0]
  n = jnp.minimum(window.num_accepted, size)
  valid = jnp.arange(size, dtype=jnp.int32) < n
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  # Without squaring or summing past float32's range: an accepted norm of
  # ~2e19 would otherwise make the threshold Inf while it stays in the window.
  # The mean is taken around the first value, `p + sum(v/n - p/n)`: exact
  # for equal values, whose threshold is then the value itself.
  pivot = window.values[0]
  mean = pivot + jnp.sum(jnp.where(valid, window.values / nf - pivot / nf,
                                   0.0))
  std = _stats.combine_norms(
      jnp.where(valid, window.values - mean, 0.0)) / jnp.sqrt(nf)
  threshold = mean + jnp.asarray(sigma, jnp.float32) * std
  return Baseline(mean, std, jnp.where(n >= min_count, threshold, jnp.inf))


def check_window(window: Any, warmup_steps: Any,
                 names: tuple[str, str] = ("window", "warmup_steps")) -> None:
  """Raises unless the history's size and warm-up are valid (`names`: the
  caller's own names for them, e.g. `guard`'s `spike_window`)."""
  window_name, warmup_name = names
  _args.check_int(window_name, window, minimum=2)
  # The warm-up is only compared with a counter: `inject_hyperparams` may
  # make it an array (a traced one is checked where it is concrete).
  # One value has no spread: a second one would be a spike if at all larger.
  _args.check_int(warmup_name, warmup_steps, minimum=2, allow_none=True,
                  injectable=True)
  warmup = (None if warmup_steps is None else
            _args.concrete_number(warmup_steps))
  if warmup is not None and warmup > window:
    raise ValueError(
        f"`{warmup_name}` must be at most `{window_name}` ({window}), but "
        f"got {warmup_steps}.")


class SkipSpikesState(NamedTuple):
  """State of `skip_spikes`: the inner state, the histories and thresholds.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.skip_spikes(optax.sgd(0.1), window=4)
    >>> _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> print(state.norm_threshold, state.skipped)  # still warming up
    inf False

  References:
    Made by `skip_spikes` (see its references); `og.metrics` reads it; `og.check` raises on it.
  """
  inner_state: Any            # the wrapped transformation's state.
  step: jax.Array             # i32[] updates seen.
  skipped: jax.Array          # bool[] the last step was skipped as a spike.
  num_spikes: jax.Array       # i32[] steps skipped as spikes so far.
  consecutive: jax.Array      # i32[] finite spikes in a row, now.
  last_spike_step: jax.Array  # i32[] `step` of the last spike, -1 if none
  # (in `guard`, the training step; inside a `skip_nonfinite`, which hides
  # its non-finite steps from it, the steps that reached `skip_spikes`).
  norms: Window               # accepted global gradient norms.
  losses: Window              # accepted losses (when `loss=` is given).
  norm_threshold: jax.Array   # f32[] threshold of the last step (Inf: warm-up).
  loss_threshold: jax.Array   # f32[] the same for the loss.
  norm_mean: jax.Array        # f32[] mean of the history the last step met.
  norm_std: jax.Array         # f32[] its standard deviation.
  loss_mean: jax.Array        # f32[] the same for the loss (0 without one).
  loss_std: jax.Array         # f32[]
  last_norm: jax.Array        # f32[] the last step's global gradient norm.
  last_loss: jax.Array        # f32[] the last step's loss (0 without one).

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {
        "optim/skipped": self.skipped,
        "optim/num_spikes": self.num_spikes,
        "optim/consecutive_spikes": self.consecutive,
        "optim/last_spike_step": self.last_spike_step,
        "grad/spike_threshold": self.norm_threshold,
        "grad/spike_mean": self.norm_mean,
        "grad/spike_std": self.norm_std,
        "loss/spike_threshold": self.loss_threshold,
        "loss/spike_mean": self.loss_mean,
        "loss/spike_std": self.loss_std,
    }


_monitor.ROLLING_BACK.append(SkipSpikesState)  # see warn_if_wrapped


def decide(state: SkipSpikesState, norm: jax.Array, loss: jax.Array | None,
           *, sigma: Any, min_count: int,
           max_consecutive: int | None) -> tuple[jax.Array, SkipSpikesState]:
  """The spike decision and the new history (`inner_state` left as it was).

  Shared by `skip_spikes` and `guard`, which measure the norm once.

  Returns:
    `(spike, state)`: `spike` is true when the step must be skipped.
  """
  size = state.norms.values.shape[0]
  norm_base = window_baseline(state.norms, sigma, min_count)
  finite = jnp.isfinite(norm)
  spike = norm > norm_base.threshold
  loss_base = Baseline(state.loss_mean, state.loss_std, state.loss_threshold)
  if loss is not None:
    loss_base = window_baseline(state.losses, sigma, min_count)
    finite = finite & jnp.isfinite(loss)
    spike = spike | (loss > loss_base.threshold)
  spike = spike | ~finite
  keep = ~spike
  # Runs count finite spikes only: a NaN/Inf step says nothing about the
  # scale, so it neither extends nor breaks a run (nor restarts the history);
  # nor does a taken step of norm 0 (no gradient: padding, a frozen phase),
  # whose breaking the run would let a lasting jump be skipped for ever.
  consecutive = jnp.where(
      finite & spike, optax.safe_increment(state.consecutive),
      jnp.where(finite & (norm > 0), 0, state.consecutive))
  # A norm of exactly 0 (no gradient at all: a frozen phase, a batch of
  # padding) says nothing about the scale; a run of them in the history
  # would make every ordinary step after it a spike.
  norms = window_push(state.norms, norm, keep & (norm > 0))
  losses = state.losses
  if loss is not None:
    losses = window_push(losses, loss, keep)
  if max_consecutive is not None:
    # The run's count stays until the next finite step (a warm-up step,
    # taken) resets it, so that the state shows why the history is empty.
    restart = finite & (consecutive >= max_consecutive)
    norms = _skip.select_tree(restart, window_init(size), norms)
    losses = _skip.select_tree(restart, window_init(size), losses)
  return spike, state._replace(
      step=optax.safe_increment(state.step),
      skipped=spike,
      num_spikes=_stats.count_if(spike, state.num_spikes),
      consecutive=consecutive,
      last_spike_step=jnp.where(spike, state.step, state.last_spike_step),
      norms=norms, losses=losses,
      norm_threshold=norm_base.threshold, norm_mean=norm_base.mean,
      norm_std=norm_base.std, loss_threshold=loss_base.threshold,
      loss_mean=loss_base.mean, loss_std=loss_base.std, last_norm=norm,
      last_loss=state.last_loss if loss is None else loss)


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    sigma: float = 6.0,
    window: int = 128,
    warmup_steps: int | None = None,
    max_consecutive: int | None = 32,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose gradient norm (or loss) spikes against its history.

  A step is a spike when its global gradient norm exceeds
  `mean + sigma * std` of the last `window` accepted norms, or, when the
  caller passes `loss=` (or `value=`), when its loss exceeds the same
  statistic of the accepted losses. Only upward outliers count. A spike
  returns an exact zero update and leaves `inner`'s state bit-identical; its
  value does not enter the history, so one spike cannot raise the threshold
  for the next. A non-finite norm or loss is always a spike (pair with
  `skip_nonfinite`, or use `guard`, to count those separately). Put a clip
  inside it (`skip_spikes(optax.chain(og.clip_by_global_norm(1.0), adam))`,
  as `guard` does), not ahead of it: it would then judge clipped norms,
  which never exceed `max_norm`, and miss the spikes.

  Around a guard-aware optimizer (`og.adamw`, `og.adam`, `og.sgd`) the skip
  rides inside the optimizer's own pass (see `GuardAwareTransformation`).
  Around any other optimizer its `update` is traced twice, once for the
  update and once for the state (on the gradients made zeros on a spike),
  and its update is written out and read once more before the state is
  selected: that lets XLA update the state in place rather than copy it.
  A NaN or Inf that `inner` makes from finite gradients is not a spike.

  The statistic is the one of OLMo-core's `SkipStepOptimizer` (mean and
  standard deviation over a rolling window, sigma 6, inactive until the window
  is half full), kept on device in a fixed ring buffer; the standard
  deviation here is the population one (OLMo-core's is the sample one,
  larger by `sqrt(n / (n - 1))`: a hair on a window of 128). A gradient
  norm of exactly 0 (no gradient at all: a frozen phase, a batch of padding)
  is accepted but does not enter the norm history, where a run of them would
  make every ordinary step after it a spike. A window forgets a
  value `window` accepted steps later and is not dragged by old values as an
  EMA of the mean and variance is; Levanter and axlearn use EMAs, MaxText a
  fixed threshold on the norm.

  Because a spike never enters the history, a lasting jump of the gradient
  norm (a new data mixture, layers unfrozen) would otherwise be skipped for
  ever and training would stop. So after `max_consecutive` finite spikes in
  a row (32 by default; a NaN/Inf step, or one without gradient (norm 0),
  neither counts nor breaks the run)
  the history is cleared and warms up again: the new scale is learned
  instead (the finite steps of the new warm-up are taken, and
  `optim/num_spikes` keeps the count). Pass None to skip for ever.

  Args:
    inner: the transformation to protect (usually the whole optimizer).
    sigma: how many standard deviations above the mean make a spike, `> 0`.
    window: how many accepted values the history holds, `>= 2`.
    warmup_steps: accepted values needed before any step can be a spike,
      `>= 2`; default `max(2, window // 2)`.
    max_consecutive: clear the history after this many finite spikes in a
      row, `>= 1`; None never clears it (a lasting jump is then skipped for
      ever). Unlike `skip_nonfinite`'s, it never halts.
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipSpikesState` (metrics `optim/skipped`, `optim/num_spikes`,
    `optim/consecutive_spikes`, `optim/last_spike_step`, and for the
    gradient norm and the loss what the last step was judged against:
    `grad/spike_threshold` = `grad/spike_mean` + sigma * `grad/spike_std`
    of the history (the threshold is Inf while it warms up),
    `loss/spike_threshold`, `loss/spike_mean`, `loss/spike_std`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=4)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for scale in [1.0, 1.1, 0.9, 1.0, 100.0]:
    ...   updates, state = tx.update({"w": jnp.full(2, scale)}, state, params)
    >>> print(updates["w"], int(state.num_spikes))
    [0. 0.] 1

  References:
    OLMo-core, `olmo_core.optim.SkipStepOptimizer`
    (https://github.com/allenai/OLMo-core); Chowdhery et al., 2022, "PaLM"
    (https://arxiv.org/abs/2204.02311), on skipping around loss spikes;
    Levanter's and axlearn's skip-on-spike rules.
  """
  _args.check_number("sigma", sigma, strict=True)
  check_window(window, warmup_steps)
  _args.check_int("max_consecutive", max_consecutive, minimum=1,
                  allow_none=True, injectable=True)
  _stats.check_axis_name(axis_name)
  inner = _skip.check_inner(inner)
  count = min_count(window, warmup_steps)

  def init_fn(params):
    inner_state = inner.init(params)
    _monitor.warn_if_wrapped(inner_state, "skip_spikes")
    i32 = lambda v: jnp.full((), v, jnp.int32)
    inf = lambda: jnp.full((), jnp.inf, jnp.float32)  # one buffer per leaf
    zero = lambda: jnp.zeros((), jnp.float32)
    return SkipSpikesState(
        inner_state=inner_state, step=i32(0),
        skipped=jnp.zeros((), jnp.bool_), num_spikes=i32(0),
        consecutive=i32(0), last_spike_step=i32(-1),
        norms=window_init(window), losses=window_init(window),
        norm_threshold=inf(), loss_threshold=inf(),
        norm_mean=zero(), norm_std=zero(), loss_mean=zero(), loss_std=zero(),
        last_norm=jnp.zeros((), jnp.float32),
        last_loss=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    check_history(state.norms, window, "skip_spikes", "window")
    norm = _stats.tree_stats(updates, axis_name=axis_name).global_norm
    loss = _skip.loss_from(extra_args, axis_name)
    extra_args = _skip.for_inner(inner, extra_args)
    spike, new_state = decide(state, norm, loss, sigma=sigma,
                              min_count=count,
                              max_consecutive=max_consecutive)
    keep = ~spike
    if _skip.is_guard_aware(inner):
      # The fast path: the optimizer takes the decision in its own pass.
      new_updates, new_inner = inner.update(
          updates, state.inner_state, params, guard_keep=keep, **extra_args)
      return new_updates, new_state._replace(inner_state=new_inner)
    new_updates, new_inner = _skip.update_unless(
        inner, updates, state.inner_state, params, extra_args, keep,
        axis_name)
    return new_updates, new_state._replace(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))
