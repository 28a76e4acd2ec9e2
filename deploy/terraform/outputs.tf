output "node_names" {
  description = "Node names, in instance order: the Ansible inventory hostnames and etcd member names."
  value       = [for index in range(var.node_count) : "${var.name}-${index + 1}"]
}

output "public_ips" {
  description = "Public IPv4 address of each node (SSH, Ansible), in instance order."
  value       = aws_instance.node[*].public_ip
}

output "private_ips" {
  description = "Private IPv4 address of each node (etcd peers, the API), in instance order."
  value       = aws_instance.node[*].private_ip
}

output "security_group_id" {
  description = "ID of the nodes' security group."
  value       = aws_security_group.node.id
}

output "ansible_inventory" {
  description = "An Ansible inventory (YAML) of the nodes in group filch, for deploy/site.yml: write it to a file and pass it with -i."
  value = templatefile("${path.module}/templates/inventory.yml.tftpl", {
    group = "filch"
    hosts = {
      for index, instance in aws_instance.node : "${var.name}-${index + 1}" => {
        ansible_host = instance.public_ip
        address      = instance.private_ip
      }
    }
    group_vars = merge({ ansible_user = var.ssh_user }, var.ansible_group_vars)
  })
}
