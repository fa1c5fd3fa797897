"""Scoring only: SlideBench MCQ and captions, cytology MCQ / grounding / regions / reports, screening
metrics, box conventions, report tables (answers are read into option letters by ``slidechat.data.answers``)."""
