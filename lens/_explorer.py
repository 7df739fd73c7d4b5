"""The attention explorer: any head's attention on your own text, as an interactive plotly figure.

``show_attention(model, text, layer=None, head=None)`` captures the chosen layers' attention with a
streaming capture (blocks of rows, never a full cache), pools it into token bins when the text is
longer than a screen can show (``metrics.binned``: each pooled row is the mean attention mass of the
bin's queries on the bin's keys, so rows still sum to 1), and draws one heatmap per head with a head
picker. Axis labels carry the token strings (``position:'token'``, or the bin's first tokens), so
hovering a cell reads "query -> key". With a census run (``run=`` a ``CensusResult``, or ``store=``
and ``run_id=``), each head's census labels (sink, retrieval, contextual, local/global, in-circuit)
are shown in the picker.
"""

from __future__ import annotations

import math

import torch

from lens._capture.needs import AttentionBlock, AttentionRows
from lens._capture.session import capture
from metrics.binned import add_block, bin_sizes, token_bins

# Heatmap cells drawn in one figure, over every head shown: keeps the HTML a few MB.
CELL_BUDGET = 1_500_000
SNIPPET_CHARS = 24


def attention_explorer(model, text: str, layer: int | None = None, head: int | None = None, *, run=None, store=None,
                       run_id: str | None = None, bos: str = "auto", max_bins: int | None = None):
    """The figure behind ``show_attention`` (see the module docstring). ``layer=None``: every layer;
    ``head=None``: every head of the chosen layers. ``max_bins`` caps the bins per axis (default: as
    many as the cell budget allows for the heads shown)."""
    info = model.info
    layers = list(range(info.n_layers)) if layer is None else [_checked(layer, info.n_layers, "layer")]
    heads = list(range(info.n_heads)) if head is None else [_checked(head, info.n_heads, "head")]
    tokens = model.tokenize(text, bos=bos)
    n_tokens = len(tokens)
    if n_tokens == 0:
        raise ValueError("the text is empty: nothing to attend to")
    n_shown = len(layers) * len(heads)
    budget_bins = int(math.sqrt(CELL_BUDGET / n_shown))
    bins = token_bins(n_tokens, min(budget_bins, max_bins or budget_bins))
    n_bins = int(bins.max()) + 1
    pooled = {layer: torch.zeros(len(heads), n_bins, n_bins) for layer in layers}
    head_index = torch.tensor(heads)

    def consume(block: AttentionBlock) -> None:
        probs = block.probs[0][head_index.to(block.probs.device)].float().cpu()
        add_block(pooled[block.layer], probs, bins[block.positions.cpu()], bins[: block.n_keys])

    capture(model, tokens, [AttentionRows(consume, positions=None, layers=layers)])
    rows = bin_sizes(bins, n_bins)
    labels = _census_labels(run, store, run_id)
    axis = _axis_labels(model.token_strings(tokens), bins, n_bins)
    return _figure(
        {(layer, head): pooled[layer][i] / rows[:, None] for layer in layers for i, head in enumerate(heads)},
        axis, labels, n_tokens, n_bins, model.name,
    )


def show_attention(model, text: str, layer: int | None = None, head: int | None = None, **options):
    """Draw the attention explorer in the notebook (or browser) and return the figure."""
    figure = attention_explorer(model, text, layer, head, **options)
    figure.show()
    return figure


def _checked(index: int, size: int, what: str) -> int:
    if not 0 <= int(index) < size:
        raise ValueError(f"{what} {index} is out of range: the model has {size} ({what}s 0..{size - 1})")
    return int(index)


def _census_labels(run, store, run_id) -> dict[tuple[int, int], str]:
    if run is not None:
        store, run_id = run.store, run.run_id
    if store is None or run_id is None:
        return {}
    from lens.views.overview import head_labels, load_run

    table = head_labels(load_run(store, run_id).frames)
    return {(int(layer), int(head)): ", ".join(group["label"]) for (layer, head), group in table.groupby(["layer", "head"])}


def _axis_labels(strings: list[str], bins: torch.Tensor, n_bins: int) -> list[str]:
    """One unique label per bin: ``position:'token'`` at token resolution, else the range and its start."""
    labels = []
    for index in range(n_bins):
        members = torch.nonzero(bins == index).flatten().tolist()
        first, last = members[0], members[-1]
        if first == last:
            labels.append(f"{first}:{strings[first]!r}")
        else:
            snippet = "".join(strings[first : last + 1])[:SNIPPET_CHARS]
            labels.append(f"{first}-{last}:{snippet!r}")
    return labels


def _figure(patterns, axis, labels, n_tokens: int, n_bins: int, model_name: str):
    import plotly.graph_objects as go

    from lens.views.style import SEQUENTIAL, styled

    resolution = "token resolution" if n_bins == n_tokens else f"{n_bins} bins of about {n_tokens / n_bins:.1f} tokens (mean over a bin's queries of the mass on a bin's keys)"
    names = []
    figure = go.Figure()
    for index, ((layer, head), pattern) in enumerate(patterns.items()):
        tag = labels.get((layer, head), "")
        names.append(f"L{layer}.H{head}" + (f" ({tag})" if tag else ""))
        figure.add_trace(go.Heatmap(
            z=pattern.numpy(), x=axis, y=axis, colorscale=SEQUENTIAL, zmin=0, zmax=1, visible=index == 0,
            colorbar=dict(title="attention"), name=names[-1],
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra>" + names[-1] + "</extra>",
        ))

    def title(index: int) -> str:
        return f"{model_name}: {names[index]}, {n_tokens} tokens at {resolution}"

    buttons = [
        dict(label=name, method="update", args=[{"visible": [i == index for i in range(len(names))]}, {"title.text": title(index)}])
        for index, name in enumerate(names)
    ]
    figure.update_layout(
        title=title(0),
        updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.12, yanchor="bottom", showactive=True)]
        if len(names) > 1 else [],
        xaxis=dict(title="key", showticklabels=n_bins <= 64, tickangle=-60),
        yaxis=dict(title="query", autorange="reversed", showticklabels=n_bins <= 64),
    )
    return styled(figure, width="double", height_in=6.5)
