"""The errors that mean bad input (reported as one line by the CLI), as opposed to bugs."""

from lens._executors import ExecutorError
from lens._models.catalog import ModelNotPreparedError
from lens._models.model import PromptTooLongError, UnknownModelError
from lens._probe_file import ProbeFileError
from lens._store.schema import SchemaMismatchError
from lens._store.store import StoreError
from probes import ProbeError, UnknownDetectorError

USER_ERRORS = (ExecutorError, UnknownModelError, ModelNotPreparedError, PromptTooLongError, ProbeFileError, ProbeError, UnknownDetectorError, StoreError, SchemaMismatchError)
