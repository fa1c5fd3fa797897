"""Plain PyTorch / transformers models: the LongNet slide encoder, the projector, SlideChat, the Qwen VL
family registry and loader, checkpoint reading with the key check, tiny test models.

Import each name from its module (``slidechat.model.slidechat_model.SlideChatModel``); this package
exports nothing, so ``slidechat.model.constants`` stays importable without torch.
"""
