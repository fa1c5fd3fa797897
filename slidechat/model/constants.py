"""Token conventions shared by data, model, testing and chat (the released SlideChat's values)."""

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids, replaced by the slide's visual tokens
IGNORE_INDEX = -100  # label value excluded from the loss
