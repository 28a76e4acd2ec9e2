output "public_ips" {
  description = "Public IPv4 address of each node."
  value       = module.filch.public_ips
}

output "ansible_inventory" {
  description = "The Ansible inventory: terraform output -raw ansible_inventory > inventory.yml"
  value       = module.filch.ansible_inventory
}
