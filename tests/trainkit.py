"""A fine-tune's Recipe and build for the unit tests: the recipe's values are
the tests' own small ones, overridden by keyword."""

from transferlab.train import trainer
from transferlab.train.recipe import Recipe


def recipe(**over) -> Recipe:
    base = dict(unfreeze=2, batch_size=8, seed=0, optimizer="adam", learning_rate=1e-2, weight_decay=0.0,
                schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0, ema=0.0, train_bn=False,
                train_depthwise=True, flip=True, augment={})
    return Recipe(**{**base, **over})


def build(spec, body, head_model, *, y_train, y_val, images=None, image_size=0, input_size=0, activations=None,
          small_size=0, **over) -> trainer.FineTuning:
    """trainer.build with `recipe(**over)`."""
    return trainer.build(spec, body, head_model, recipe(**over), y_train=y_train, y_val=y_val, images=images,
                         image_size=image_size, input_size=input_size, activations=activations,
                         small_size=small_size)
