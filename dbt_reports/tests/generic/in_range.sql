{% test in_range(model, column_name, min, max) %}
-- Fails on rows whose value lies outside [min, max] (accepted_range without a dbt package).
select * from {{ model }} where {{ column_name }} < {{ min }} or {{ column_name }} > {{ max }}
{% endtest %}
