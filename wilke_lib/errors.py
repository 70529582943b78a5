"""The errors the library raises on bad input, in one place (nothing here imports the rest)."""


class EditError(ValueError):
    """An impossible edit (empty subject, subject not in the prompt, empty target, NaN loss, singular
    system, ...). When `editing.edit` raises it, the weights are bit-identical to before."""


class RecordError(ValueError):
    """A CounterFact record does not follow the schema, or cannot be used with this model."""
