"""The k-means LoRA adapter selector ("Adapters Selector", COLING 2025): one LoRA adapter
per task, a selector trained on the samples nearest k-means centres, routed generation,
and adapters added or removed by updating the selector only."""

from flywheel.selectors.adapters import (
    AdapterLibrary,
    LoraTraining,
    PromptEmbedder,
    SelectorInputError,
    folder_digest,
    load_base,
    train_lora,
)
from flywheel.selectors.kmeans import (
    AdaptersSelector,
    HeadSelector,
    LoraSelector,
    RoutedGenerator,
    Selector,
    SelectorConfig,
    generate_greedy,
    kmeans_select,
    load_selector,
    new_selector,
    random_select,
    routing_accuracy,
    select_samples,
    selector_config,
)

__all__ = [
    "AdapterLibrary",
    "AdaptersSelector",
    "HeadSelector",
    "LoraSelector",
    "LoraTraining",
    "PromptEmbedder",
    "RoutedGenerator",
    "Selector",
    "SelectorConfig",
    "SelectorInputError",
    "folder_digest",
    "generate_greedy",
    "kmeans_select",
    "load_base",
    "load_selector",
    "new_selector",
    "random_select",
    "routing_accuracy",
    "select_samples",
    "selector_config",
    "train_lora",
]
