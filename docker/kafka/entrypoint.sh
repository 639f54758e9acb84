#!/bin/sh
# Render cluster.properties from the environment and the mounted secrets, format
# storage once (with every principal's SCRAM credential), run the broker.
# KAFKA_NODE_ID (1..n), KAFKA_HOST (this node's name on the network),
# KAFKA_VOTERS ("1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"),
# KAFKA_CLUSTER_ID (22-char base64url, the same on every node).
# /secrets/kafka (read-only mounts, written by `capledger dev deploy-secrets`):
#   ca.pem, broker.p12, broker.p12.password, credentials/<principal>.password.
# No password is put on a command line: format reads them from a 0600 argument file.
set -eu
: "${KAFKA_NODE_ID:?}" "${KAFKA_HOST:?}" "${KAFKA_VOTERS:?}" "${KAFKA_CLUSTER_ID:?}"
secrets=/secrets/kafka
for f in ca.pem broker.p12 broker.p12.password credentials/admin.password; do
  [ -s "$secrets/$f" ] || { echo "missing secret $secrets/$f" >&2; exit 2; }
done
umask 077
props=/var/lib/kafka/server.properties
keystore_password=$(tr -d '\n' < "$secrets/broker.p12.password")
admin_password=$(tr -d '\n' < "$secrets/credentials/admin.password")
sed -e "s|@NODE_ID@|${KAFKA_NODE_ID}|g" -e "s|@HOST@|${KAFKA_HOST}|g" \
    -e "s|@VOTERS@|${KAFKA_VOTERS}|g" -e "s|@KEYSTORE_PASSWORD@|${keystore_password}|g" \
    -e "s|@ADMIN_PASSWORD@|${admin_password}|g" /opt/kafka/cluster.properties > "$props"
cp="/opt/kafka/libs/*"
log4j="-Dlog4j2.configurationFile=/opt/kafka/log4j2.xml"
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  args=/var/lib/kafka/format.args
  printf '%s\n' kafka.tools.StorageTool format "--cluster-id=$KAFKA_CLUSTER_ID" \
    "--config=$props" > "$args"
  for file in "$secrets"/credentials/*.password; do
    name=$(basename "$file" .password)
    printf '"--add-scram"\n"SCRAM-SHA-512=[name=%s,password=%s]"\n' \
      "$name" "$(tr -d '\n' < "$file")" >> "$args"
  done
  java $log4j -cp "$cp" "@$args"
  rm -f "$args"
fi
exec java ${KAFKA_HEAP_OPTS:--Xms1g -Xmx1g} -XX:+UseG1GC $log4j -cp "$cp" kafka.Kafka "$props"
