{% macro with_model_and_edit(relation) %}
{#- Every row of an evaluation table, its variant key <model>__<edit> (resources/config.py) split. #}
select *, split_part(variant, '__', 1) as model, split_part(variant, '__', 2) as edit
from {{ relation }}
{% endmacro %}
