"""Training stage, model: the slice classifier built on the EfficientNet-Lite0 backbone.

The model takes what ``node.preprocess`` produces, a ``(size, size, 1)`` float32 slice in [0, 1],
and does the backbone's own input scaling inside the graph, so the node never has to know it:
[0, 1] -> 0..255 -> ``(x - 127) / 128`` -> grey repeated to three channels -> Lite0 features ->
global average pooling -> dropout -> softmax.  Only built-in Keras layers are used, so a saved
``model.keras`` loads without ``custom_objects``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
from keras import layers

from training.backbone import NUM_BLOCKS, block_prefix, build_lite0

logger = logging.getLogger(__name__)

BACKBONE_NAME = "efficientnet_lite0"
POOL_NAME = "avg_pool"
CLASSIFIER_NAME = "classifier"
HEAD_PREFIX = "head_"


def build_classifier(
    num_classes: int,
    input_size: int,
    backbone_weights: Path | None,
    dropout: float = 0.2,
) -> keras.Model:
    """Build the slice classifier.

    Parameters
    ----------
    num_classes
        Number of output classes (softmax).
    input_size
        Side of the square input slice, as produced by ``node.preprocess``.
    backbone_weights
        Lite0 ImageNet checkpoint (``training.backbone.lite0_weights_path()``) or ``None`` for a
        randomly initialised backbone.
    dropout
        Dropout rate before the classifier layer.

    Returns
    -------
    keras.Model
        Input ``(input_size, input_size, 1)`` float32 in [0, 1]; output ``(num_classes,)``
        probabilities from the Dense layer named ``classifier``.  The backbone is the nested
        model named ``efficientnet_lite0``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    inputs = keras.Input(shape=(input_size, input_size, 1), dtype="float32", name="slice")
    # [0, 1] -> 0..255 -> (x - 127) / 128, in one affine layer.
    x = layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="normalise")(inputs)
    x = layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    backbone = build_lite0((input_size, input_size, 3), include_top=False, weights=backbone_weights)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name=POOL_NAME)(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name=CLASSIFIER_NAME)(x)
    return keras.Model(inputs, outputs, name="lite0_slice_classifier")


def set_backbone_trainable(model: keras.Model, top_blocks: int) -> None:
    """Freeze the backbone, then unfreeze its top ``top_blocks`` MBConv blocks and head conv.

    BatchNormalization layers stay frozen throughout, as is standard when fine-tuning a
    pretrained network on a small dataset: their ImageNet moving statistics are kept, and in
    Keras a non-trainable BN layer also runs in inference mode, so small, class-skewed batches
    cannot disturb the features.  ``top_blocks=0`` trains only the classifier head.

    Parameters
    ----------
    model
        A model from :func:`build_classifier`.
    top_blocks
        How many of the 16 MBConv blocks, counted from the output end, to train.  Any value
        greater than zero also trains the 1x1 head convolution.
    """
    if not 0 <= top_blocks <= NUM_BLOCKS:
        raise ValueError(f"top_blocks must be in 0..{NUM_BLOCKS}, got {top_blocks}")
    backbone = model.get_layer(BACKBONE_NAME)
    backbone.trainable = True  # the nested model's flag gates all of its layers
    trainable_prefixes = tuple(block_prefix(i) for i in range(NUM_BLOCKS - top_blocks, NUM_BLOCKS))
    if top_blocks > 0:
        trainable_prefixes += (HEAD_PREFIX,)
    for layer in backbone.layers:
        layer.trainable = layer.name.startswith(trainable_prefixes) and not isinstance(
            layer, layers.BatchNormalization
        )
    logger.info(
        "backbone: %d of %d weights trainable (top %d blocks)",
        len(backbone.trainable_weights),
        len(backbone.weights),
        top_blocks,
    )


def embedding_model(model: keras.Model) -> keras.Model:
    """Return the model from the input slice to the pooled backbone features.

    Used to compute features once and train the classifier head on the cache.

    Parameters
    ----------
    model
        A model from :func:`build_classifier`.

    Returns
    -------
    keras.Model
        Shares layers and weights with ``model``; output ``(1280,)`` per slice.
    """
    return keras.Model(model.inputs, model.get_layer(POOL_NAME).output, name="lite0_embedding")
